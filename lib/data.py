"""Preference data: sources, the HH-RLHF dialogue split, chat templates, tokenization, the filter every stage
applies.

A pair is {"prompt", "chosen", "rejected"}; chosen and rejected hold the responses only. Each is a string, or
(conversational pairs, TRL's layouts) a list of {"role", "content"} messages. row_to_pair is the one place a
source row of any layout becomes a pair; pair_to_row writes a pair back in the layout it was read in.
A row that cannot be represented is skipped and counted with its file:line (Skips), or with --strict raises.

Tokenization, one convention everywhere (docs/data.md says why). Text pairs:
    prompt_ids   = tokenizer(prompt).input_ids                 (the tokenizer's own special tokens, e.g. BOS)
    response_ids = tokenizer(prompt + response).input_ids[len(prompt_ids):] + [eos]   when prompt_ids is a
                   prefix of the joint tokenization (the usual case), else
                   tokenizer(response, add_special_tokens=False).input_ids + [eos]   (counted as a fallback)
Conversational pairs are first rendered by the tokenizer's chat template (render_pair), then tokenized the same
way without adding special tokens (the rendered text holds them), and EOS is appended only to a response that
does not already end with it. A special-token string inside a message or a string pair's text is text
(tokenize_conversation_as_text, split_special_tokens): only the template's markers, BOS and EOS are special.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field

from lib.console import WltError, log, progress, warn_once
from lib.files import iter_jsonl


@dataclass
class Skips:
    """Counts of skipped rows by reason, with the first few locations of each, for the stage's summary."""
    counts: dict = field(default_factory=dict)
    where: dict = field(default_factory=dict)
    strict: bool = False

    def add(self, reason: str, loc: str, policy: bool = False) -> None:
        """Count a skipped row. policy=True: a documented filter (e.g. the length limit), never an error."""
        if self.strict and not policy:
            raise WltError(f"{loc}: {reason} (--strict turns skips into errors)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.where.setdefault(reason, [])
        if len(self.where[reason]) < 5:
            self.where[reason].append(loc)

    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, what: str) -> None:
        for reason, n in self.counts.items():
            log(f"{what}: skipped {n} row(s): {reason} (e.g. {', '.join(self.where[reason])})")

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.where.items()}}


# ----------------------------------------------------------------------------------------------------------
# rows -> pairs

HH_ASSISTANT = "\n\nAssistant:"


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two raw HH-RLHF dialogues into (prompt, chosen_response, rejected_response).

    The prompt is the longest common prefix of the two dialogues, cut just after the last "\\n\\nAssistant:"
    inside that prefix; the responses are the rest. So prompt + response reproduces each dialogue exactly,
    even when a response itself contains further "Human:"/"Assistant:" turns (real rows do).
    Raises ValueError when the dialogues are identical or share no "\\n\\nAssistant:".
    """
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)  # rfind's end bound: the marker must lie wholly inside chosen[:n]
    if cut < 0:
        raise ValueError('no "\\n\\nAssistant:" in the shared prefix of the two dialogues')
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def is_messages(v) -> bool:
    """A conversation: a list of {"role": str, "content": str, ...} messages."""
    return isinstance(v, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in v)


def split_conversations(chosen: list, rejected: list) -> tuple[list, list, list]:
    """TRL's implicit prompt: the longest shared opening run of messages of the two conversations is the prompt,
    the rest of each is its response. Raises ValueError when they share no opening message or one conversation
    is the other's opening (a response would be empty)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError("the two conversations share no opening message (no prompt)")
    if n == len(chosen) or n == len(rejected):
        raise ValueError("one conversation is the opening of the other (an empty response)")
    return chosen[:n], chosen[n:], rejected[n:]


def row_layout(row: dict) -> str:
    """The layout of a source row: "text" (strings: pair form, or raw HH-RLHF dialogues), "explicit"
    (conversational with a "prompt" conversation) or "implicit" (conversational chosen/rejected, the prompt
    being their shared opening; a "prompt" string beside them, as some hub sets carry, is not used)."""
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        return "explicit" if isinstance(row.get("prompt"), list) else "implicit"
    return "text"


def row_to_pair(row: dict, loc: str, skips: Skips) -> dict | None:
    """One source row -> a pair, or a counted skip. Layouts (detected per row, row_layout):
    {"prompt", "chosen", "rejected"} strings: pair form (the project's own, Dahoas/full-hh-rlhf, TL;DR);
    {"chosen", "rejected"} strings without "prompt": raw HH-RLHF dialogues, split by split_hh;
    {"prompt", "chosen", "rejected"} conversations: TRL's explicit prompt, taken as it is;
    {"chosen", "rejected"} conversations: TRL's implicit prompt, split by split_conversations."""
    for k in ("chosen", "rejected"):
        if k not in row:
            skips.add(f'missing field "{k}"', loc)
            return None
    layout = row_layout(row)
    if layout != "text":
        for k in ("prompt", "chosen", "rejected") if layout == "explicit" else ("chosen", "rejected"):
            if not is_messages(row[k]):
                skips.add(f'field "{k}" is not a list of {{"role", "content"}} messages', loc)
                return None
        if layout == "explicit":
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        else:
            try:
                prompt, chosen, rejected = split_conversations(row["chosen"], row["rejected"])
            except ValueError as e:
                skips.add(f"conversations cannot be split: {e}", loc)
                return None
    else:
        for k in ("chosen", "rejected"):
            if not isinstance(row[k], str):
                skips.add(f'field "{k}" is not a string', loc)
                return None
        if "prompt" in row:
            if not isinstance(row["prompt"], str):
                skips.add('field "prompt" is not a string', loc)
                return None
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            # TL;DR layout: responses start with "TL;DR:"; keep them on their own line after the post.
            if chosen.startswith("TL;DR:") and prompt and not prompt[-1].isspace():
                prompt += "\n"
        else:
            try:
                prompt, chosen, rejected = split_hh(row["chosen"], row["rejected"])
            except ValueError as e:
                skips.add(f"HH dialogue cannot be split: {e}", loc)
                return None
    if chosen == rejected:
        skips.add("chosen and rejected responses are identical", loc)
        return None
    if not chosen or not rejected:
        skips.add("empty response", loc)
        return None
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for k, v in row.items():  # keep extra fields a producer added (e.g. rewards written by label.py), except
        if k not in pair and k != "response":  # Dahoas/full-hh-rlhf's "response", a copy of "chosen"
            pair[k] = v
    return pair


def pair_to_row(pair: dict, layout: str) -> dict:
    """A pair as a row of `layout` (row_layout): an implicit-prompt row gets its whole conversations back, the
    prompt in front of each response; the other layouts are the pair itself."""
    if layout != "implicit":
        return pair
    row = {"chosen": pair["prompt"] + pair["chosen"], "rejected": pair["prompt"] + pair["rejected"]}
    row.update((k, v) for k, v in pair.items() if k not in row and k != "prompt")
    return row


def is_conversational(pair: dict) -> bool:
    return isinstance(pair["prompt"], list)


def pair_text(v) -> str:
    """A prompt or response as one string, for what needs text whatever the layout (a text-pair reward model):
    a string as it is, a conversation as its messages' contents separated by blank lines."""
    return v if isinstance(v, str) else "\n\n".join(m["content"] for m in v)


def pair_key(v) -> str:
    """A prompt or response as an exact string (for a hash): a string as it is, a conversation as JSON."""
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False)


def collect_pairs(numbered_rows, origin: str, skips: Skips, pairs: list, locs: list, layouts: list | None = None) -> None:
    """Append the pair of each (line_number, row) to `pairs`, its "origin:line" to `locs` and its row_layout
    to `layouts` (when a list); rows that cannot be represented are counted in `skips`."""
    for i, row in numbered_rows:
        p = row_to_pair(row, f"{origin}:{i}", skips)
        if p is not None:
            pairs.append(p)
            locs.append(f"{origin}:{i}")
            if layouts is not None:
                layouts.append(row_layout(row))


def read_pairs(path: str, skips: Skips | None = None, locs: list | None = None,
               layouts: list | None = None) -> list[dict]:
    """Read a pair file (.jsonl, .jsonl.gz, .json or .parquet, any layout row_to_pair accepts). Bad JSON is an
    error naming file:line; unrepresentable rows are counted in `skips` (or raise under skips.strict). If `locs`
    is a list, the "file:line" of each returned pair is appended to it (for later skips, e.g. too long); if
    `layouts` is, each pair's row_layout (to write it back as it was read, pair_to_row)."""
    pairs = []
    collect_pairs(_file_rows(path), path, skips if skips is not None else Skips(), pairs,
                  locs if locs is not None else [], layouts)
    return pairs



def read_prompts(path: str) -> list:
    """The prompts of a file (evaluate.py): each row's "prompt" (a string or a conversation), or, for a row
    without one, the prompt of the pair row_to_pair makes of it (TRL's implicit layout). A row with neither is
    an error naming file:line."""
    prompts, skips = [], Skips(strict=True)
    for i, row in _file_rows(path):
        p = row.get("prompt")
        if row_layout(row) == "implicit":  # the prompt is the conversations' shared opening
            try:
                p = row_to_pair(row, f"{path}:{i}", skips)["prompt"]
            except WltError as e:
                raise WltError(str(e).replace(" (--strict turns skips into errors)", "")) from None
        elif not (isinstance(p, str) or (is_messages(p) and p)):
            raise WltError(f'{path}:{i}: no "prompt" field (a string or a list of messages)')
        prompts.append(p)
    return prompts

def _local_source_files(path: str) -> dict[str, list[str]]:
    """Files of a local source by split. A file: everything is 'train'. A folder: every .jsonl, .jsonl.gz or
    .parquet below it whose name, or else whose parent folder's name, starts with train or test (the hub's
    harmless-base/train.jsonl.gz, data/train-0000.parquet and train/0000.parquet layouts)."""
    exts = (".jsonl", ".jsonl.gz", ".json", ".parquet")
    if os.path.isfile(path):
        return {"train": [path], "test": []}
    if not os.path.isdir(path):
        raise WltError(f"{path}: no such file or folder (sources: hh-rlhf, tldr, synthetic, or a local path)")
    out = {"train": [], "test": []}
    for root, _, files in sorted(os.walk(path)):
        for fn in sorted(files):
            if not fn.endswith(exts):
                continue
            split = next((s for name in (fn, os.path.basename(root)) for s in ("train", "test")
                          if name.startswith(s)), None)
            if split:
                out[split].append(os.path.join(root, fn))
            else:  # e.g. hh-rlhf's red-team-attempts/red_team_attempts.jsonl.gz (another schema)
                log(f"{os.path.join(root, fn)}: ignored (neither it nor its folder is named train* or test*)")
    if not out["train"] and not out["test"]:
        raise WltError(f"{path}: no train*/test* .jsonl, .jsonl.gz or .parquet files in this folder")
    return out


def _file_rows(path: str):
    """(line_number, row) pairs of a .jsonl(.gz) file (read here: a bad line is an error naming it), or of a
    .json or .parquet file, read through `datasets` (row numbers)."""
    if path.endswith((".parquet", ".json")):
        if not os.path.isfile(path):
            raise WltError(f"{path}: no such file")
        import datasets  # pyarrow comes with it
        try:
            ds = datasets.load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train")
        except Exception as e:  # malformed JSON, a schema pyarrow cannot hold, ...
            raise WltError(f"{path}: cannot be read as a table of rows ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        for i, row in enumerate(ds, 1):
            yield i, row
    else:
        yield from iter_jsonl(path)


HUB_PRESETS = {"hh-rlhf": "Anthropic/hh-rlhf", "tldr": "CarperAI/openai_summarize_comparisons"}


def is_hub_name(src: str) -> bool:
    """A --data value that names a hub dataset: a preset, or anything that is not a local path (an existing
    one, an absolute or ./ path, or a file name with a data extension)."""
    if os.path.exists(src):
        return False
    if src in HUB_PRESETS:
        return True
    return not (os.path.isabs(src) or src.startswith((".", "~")) or src.endswith((".jsonl", ".gz", ".json", ".parquet")))


def _hub_splits(src: str, config: str | None, splits: dict[str, str | None]) -> dict:
    """{"train": rows, "test": rows or None} of a hub dataset, read through `datasets`; a clear error when the
    hub cannot be reached or a named split does not exist."""
    name = HUB_PRESETS.get(src, src)
    try:
        import datasets
        ds = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as e:  # offline, no access, a set that needs a config, ...
        local = "" if src in HUB_PRESETS else f"no local file or folder {src!r}, and "
        raise WltError(f"{local}could not load {name}{f' ({config})' if config else ''} from the hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); download it "
                           f"elsewhere and pass its local folder or file to --data") from None
    out = {}
    for part, split in splits.items():
        if split and split not in ds:
            if part == "train" or split != "test":  # an explicitly named split must exist
                raise WltError(f"{name}: no split {split!r} (splits: {', '.join(ds)}); choose one with "
                                   f"--{part}-split")
            split = None  # the default test split is optional: prepare carves one
        out[part] = (f"{name}/{split}", ds[split]) if split else None
    return out


def load_source(src: str, skips: Skips, locs: dict | None = None, layouts: dict | None = None,
                config: str | None = None, train_split: str = "train", test_split: str | None = "test") -> dict[str, list[dict]]:
    """Load a preference source into {"train": [pairs], "test": [pairs]} (test may be empty). If `locs` is
    given, locs[split] receives the "file:line" of each returned pair, in the same order; `layouts[split]`
    likewise each pair's row_layout.

    src: a local file/folder in any layout row_to_pair reads, or a hub dataset by name ("hh-rlhf" and "tldr"
    name Anthropic/hh-rlhf and CarperAI/openai_summarize_comparisons), read through `datasets` with `config`,
    its splits named by train_split / test_split (a missing "test" split leaves test empty). Folders with
    another schema are skipped with a message (e.g. hh-rlhf's red-team-attempts). The synthetic world is made
    by lib/synthetic.py.
    """
    out = {"train": [], "test": []}
    locs = locs if locs is not None else {}
    layouts = layouts if layouts is not None else {}
    for split in out:
        locs.setdefault(split, [])
        layouts.setdefault(split, [])
    if is_hub_name(src):
        for split, got in _hub_splits(src, config, {"train": train_split, "test": test_split}).items():
            if got:
                origin, rows = got
                collect_pairs(enumerate(rows, 1), origin, skips, out[split], locs[split], layouts[split])
        return out
    for split, files in _local_source_files(src).items():
        for path in files:
            rows = _file_rows(path)
            first = next(rows, None)
            if first is None:
                log(f"{path}: empty file, nothing read")
                continue
            if not {"chosen", "rejected"} <= set(first[1]):
                log(f"{path}: skipped, not a preference file (fields: {', '.join(sorted(first[1]))})")
                continue
            collect_pairs(itertools.chain([first], rows), path, skips, out[split], locs[split], layouts[split])
    return out


# ----------------------------------------------------------------------------------------------------------
# pairs -> token ids


def require_chat_template(tok, what: str) -> None:
    """Conversational data needs the tokenizer's chat template: a one-line error without one."""
    if not getattr(tok, "chat_template", None):
        raise WltError(f"{what}: conversational rows need a chat template, and tokenizer "
                           f"{getattr(tok, 'name_or_path', '')!r} has none; use a chat model's tokenizer, or "
                           f"string pairs")


def render_prompt(tok, messages: list) -> str:
    """A conversational prompt as the model reads it before answering: the chat template with the generation
    prompt (the assistant turn's opening)."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_pair(tok, pair: dict) -> tuple[str, dict[str, str]]:
    """A conversational pair as text: (prompt text, {"chosen": text, "rejected": text}). prompt text =
    render_prompt(prompt); a response's text = template(prompt + response messages)[len(prompt text):], so
    prompt text + response text is the whole rendered conversation, the response being the assistant turn with
    its end-of-turn token. Raises ValueError when the prompt's rendering is not the opening of a conversation's
    (a template that renders earlier turns differently once more follow) or the template rejects the messages."""
    try:
        prompt = render_prompt(tok, pair["prompt"])
        full = {k: tok.apply_chat_template(pair["prompt"] + pair[k], tokenize=False) for k in ("chosen", "rejected")}
    except Exception as e:  # the template's own checks (e.g. roles must alternate) raise from jinja
        raise ValueError(f"the chat template rejects the conversation ({type(e).__name__})") from None
    if not all(f.startswith(prompt) for f in full.values()):
        raise ValueError("the rendered prompt is not the opening of the rendered conversation")
    return prompt, {k: f[len(prompt):] for k, f in full.items()}


def encode_prompts(tok, prompts: list) -> list[list[int]]:
    """Prompt ids by the one convention: a string with the tokenizer's own special tokens (BOS); a conversation
    rendered by render_prompt, whose text already holds them (no second BOS). Special-token strings in a prompt's
    text are text (encode_conversation)."""
    out, specials = [None] * len(prompts), special_pattern(tok)
    as_text = {i for i, p in enumerate(prompts) if holds_special(specials, [p] if isinstance(p, str) else
                                                                 [m["content"] for m in p])}
    text = [i for i, p in enumerate(prompts) if isinstance(p, str) and i not in as_text]
    conv = [i for i, p in enumerate(prompts) if not isinstance(p, str) and i not in as_text]
    if text:
        for i, ids in zip(text, tok([prompts[i] for i in text]).input_ids):
            out[i] = list(ids)
    if conv:
        enc = tok([render_prompt(tok, prompts[i]) for i in conv], add_special_tokens=False).input_ids
        for i, ids in zip(conv, enc):
            out[i] = list(ids)
    for i in as_text:
        p = prompts[i]
        out[i] = (list(tok(p, split_special_tokens=True).input_ids) if isinstance(p, str)
                  else encode_conversation(tok, p, True, specials))
    return out


# ----------------------------------------------------------------------------------------------------------
# text that holds special-token strings. The content of a message, and a string pair's prompt and responses, is
# text: a special-token string inside it ("<|im_end|>" in a user's message from the web) is tokenized as the
# characters it is made of, never as the control token, so that data cannot open or close turns of its own. A
# chat template's own markers stay special. Only a row that holds such a string takes this path: every other row
# is tokenized exactly as before, by one call of the tokenizer on the whole text.

_SENTINEL = "\ue000{}\ue001"  # a message's place in a rendering: private-use characters, which no template writes
_SENTINELS = re.compile("\ue000(\\d+)\ue001")


def special_pattern(tok):
    """The strings a tokenizer reads as one control token wherever they occur in text (its added tokens marked
    special: BOS, EOS, a chat template's turn markers), as one pattern, longest first; None when it has none."""
    strings = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    strings |= set(getattr(tok, "all_special_tokens", []))
    strings = sorted((s for s in strings if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def holds_special(specials, texts) -> bool:
    """Whether any of the texts holds a special-token string (specials: special_pattern's)."""
    return specials is not None and any(specials.search(t) for t in texts)


def contents(pair: dict) -> list[str]:
    """The text a pair's author wrote: its strings, or its messages' contents (not the roles a template uses)."""
    return [m["content"] for k in ("prompt", "chosen", "rejected") for m in pair[k]] if is_conversational(pair) \
        else [pair[k] for k in ("prompt", "chosen", "rejected")]


def render_marked(tok, messages: list, generation_prompt: bool) -> tuple[str, list[tuple[int, int]]] | None:
    """The chat template's rendering of `messages` and the character spans of their contents in it: rendered once
    as it is and once with each content replaced by a sentinel, the template's own text being what lies between
    the sentinels. A content the template trims of white space is found trimmed. None where the template changes a
    content otherwise (then what is content cannot be told)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    marked = [dict(m, content=_SENTINEL.format(i)) for i, m in enumerate(messages)]
    parts = _SENTINELS.split(tok.apply_chat_template(marked, tokenize=False, add_generation_prompt=generation_prompt))
    if not text.startswith(parts[0]):
        return None
    pos, spans = len(parts[0]), []
    for k in range(1, len(parts), 2):  # parts: template text, message index, template text, ...
        c, after = messages[int(parts[k])]["content"], parts[k + 1]
        for seen in dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip())):
            if text.startswith(seen, pos) and text.startswith(after, pos + len(seen)):
                break
        else:
            return None
        spans.append((pos, pos + len(seen)))
        pos += len(seen) + len(after)
    return (text, spans) if pos == len(text) else None


def encode_marked(tok, text: str, spans: list[tuple[int, int]], specials) -> list[int]:
    """Token ids of a rendered conversation whose content spans are text: the special-token strings outside them
    (the template's) become their ids, and each stretch between two of those is tokenized as text, the special
    strings in it included (split_special_tokens), as the tokenizer tokenizes a stretch between special tokens."""
    cuts, start = [], 0
    for s, e in [*spans, (len(text), len(text))]:
        cuts += list(specials.finditer(text, start, s)) if specials is not None else []
        start = e
    ids, start = [], 0
    for m in cuts:
        if m.start() > start:
            ids += tok(text[start:m.start()], add_special_tokens=False, split_special_tokens=True).input_ids
        ids.append(tok.convert_tokens_to_ids(m.group()))
        start = m.end()
    if start < len(text):
        ids += tok(text[start:], add_special_tokens=False, split_special_tokens=True).input_ids
    return ids


def _clip(spans: list[tuple[int, int]], a: int) -> list[tuple[int, int]]:
    """Spans of a text as spans of its part from character a on."""
    return [(max(s, a) - a, e - a) for s, e in spans if e > a]


def _faithful(tok, messages: list, specials) -> bool:
    """Whether encode_marked tokenizes these messages, their special-token strings taken out, exactly as the
    tokenizer does their whole rendering: true of tokenizers that tokenize each stretch between special tokens
    on its own (byte-level BPE: GPT-2, Llama-3, Qwen, SmolLM2); not of one that marks only the start of a text."""
    clean = [dict(m, content=specials.sub("", m["content"])) for m in messages]
    r = render_marked(tok, clean, False)
    return r is not None and encode_marked(tok, *r, specials) == tok(r[0], add_special_tokens=False).input_ids


def tokenize_conversation_as_text(tok, pair: dict, specials) -> tuple[dict | str, int]:
    """A conversational pair that holds special-token strings, tokenized by the convention with its contents as
    text: (row as tokenize_pairs makes it, or the reason it is skipped; responses tokenized alone)."""
    try:
        prompt = render_marked(tok, pair["prompt"], True)
        full = {k: render_marked(tok, pair["prompt"] + pair[k], False) for k in ("chosen", "rejected")}
    except Exception as e:  # the template's own checks (e.g. roles must alternate) raise from jinja
        return f"the chat template rejects the conversation ({type(e).__name__})", 0
    if prompt is None or None in full.values() or not _faithful(tok, pair["prompt"] + pair["chosen"], specials):
        return ("a message holds a special-token string, which this tokenizer and chat template cannot keep as "
                "text"), 0
    if not all(f[0].startswith(prompt[0]) for f in full.values()):
        return "the rendered prompt is not the opening of the rendered conversation", 0
    p_ids, n, fallbacks = encode_marked(tok, *prompt, specials), len(prompt[0]), 0
    row = {"prompt_ids": p_ids}
    for k, (text, spans) in full.items():
        joint = encode_marked(tok, text, spans, specials)
        if joint[:len(p_ids)] == p_ids:
            r = joint[len(p_ids):]
        else:
            fallbacks += 1
            r = encode_marked(tok, text[n:], _clip(spans, n), specials)
        row[f"{k}_ids"] = r + ([] if text[n:].rstrip().endswith(tok.eos_token) else [tok.eos_token_id]) if r else []
    return row, fallbacks


def encode_conversation(tok, messages: list, generation_prompt: bool, specials) -> list[int]:
    """Token ids of a rendered conversation (evaluate.py's prompts and reward-model inputs), its contents as text
    where they hold special-token strings; where the template does not allow that, as the template renders it,
    with a warning (a prompt to evaluate cannot be left out)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if holds_special(specials, [m["content"] for m in messages]):
        r = render_marked(tok, messages, generation_prompt)
        if r is not None and _faithful(tok, messages, specials):
            return encode_marked(tok, *r, specials)
        warn_once(("special text", id(tok)), f"a message holds a special-token string that tokenizer "
                  f"{getattr(tok, 'name_or_path', '')!r} and its chat template cannot keep as text: tokenized as the "
                  f"template renders it")
    return tok(text, add_special_tokens=False).input_ids


def tokenize_pairs(tok, pairs: list[dict], batch: int = 512, desc: str = "tokenize") -> tuple[list[dict], int]:
    """Tokenize pairs with the convention above. Returns ([{"prompt_ids", "chosen_ids", "rejected_ids"}],
    number of responses that needed the fallback, also reported under `desc`). Response ids include the EOS
    id (conversational: unless the rendered response already ends with EOS); a response with no token before
    EOS gets an empty list (the caller skips it). A conversational pair the chat template cannot render as
    prompt + responses gets empty lists and its reason under "skip" (usable_pairs counts it)."""
    eos = tok.eos_token_id
    if eos is None:
        raise WltError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no EOS token; set one")
    if any(is_conversational(p) for p in pairs):
        require_chat_template(tok, desc)
    out, fallbacks, specials = [], 0, special_pattern(tok)
    bar = progress(len(pairs), desc, "pair") if len(pairs) >= 4 * batch else None
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        # each pair as text: (prompt, {response}, special tokens added by the tokenizer?, EOS already there?,
        # special-token strings in it read as text?); a skip's reason; or (a conversation that holds special-token
        # strings) its row, tokenized already
        texts = []
        for p in chunk:
            as_text = holds_special(specials, contents(p))
            if not is_conversational(p):
                texts.append((p["prompt"], {k: p[k] for k in ("chosen", "rejected")}, True, {}, as_text))
                continue
            if as_text:
                row, n = tokenize_conversation_as_text(tok, p, specials)
                texts.append(row)
                fallbacks += n
                continue
            try:
                prompt, resp = render_pair(tok, p)
            except ValueError as e:
                texts.append(str(e))
                continue
            # ChatML's "<|im_end|>\n": the end-of-turn token, then the template's newline
            texts.append((prompt, resp, False, {k: r.rstrip().endswith(tok.eos_token) for k, r in resp.items()}, False))
        for special, as_text in ((True, False), (False, False), (True, True)):
            sel = [j for j, t in enumerate(texts) if isinstance(t, tuple) and t[2] == special and t[4] == as_text]
            if not sel:
                continue
            kw = {"split_special_tokens": True} if as_text else {}  # only then: other rows as they always were
            p_ids = tok([texts[j][0] for j in sel], add_special_tokens=special, **kw).input_ids
            enc = {k: tok([texts[j][0] + texts[j][1][k] for j in sel], add_special_tokens=special, **kw).input_ids
                   for k in ("chosen", "rejected")}
            for m, j in enumerate(sel):
                row = {"prompt_ids": list(p_ids[m])}
                for k in ("chosen", "rejected"):
                    joint, n = enc[k][m], len(p_ids[m])
                    if joint[:n] == p_ids[m]:
                        r = list(joint[n:])
                    else:
                        fallbacks += 1
                        r = tok(texts[j][1][k], add_special_tokens=False, **kw).input_ids
                    row[f"{k}_ids"] = r + ([] if texts[j][3].get(k) else [eos]) if r else []
                texts[j] = row
        for t in texts:
            out.append({"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "skip": t} if isinstance(t, str) else t)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    if fallbacks:
        log(f"{desc}: {fallbacks} response(s) tokenized alone (prompt ids not a prefix of the joint ids)")
    return out, fallbacks


def fit_pair(ex: dict, max_len: int) -> dict | None:
    """Fit a tokenized pair into max_len: prompt tokens are dropped from the left, never response tokens.
    Returns None when a response alone leaves no room for at least one prompt token."""
    longest = max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
    room = max_len - longest
    if room < 1:
        return None
    if len(ex["prompt_ids"]) > room:
        ex = dict(ex, prompt_ids=ex["prompt_ids"][-room:])
    return ex


def usable_pairs(exs: list[dict], locs: list[str], max_len: int, skips: Skips, responses=("chosen", "rejected"),
                 too_long: str = "fit") -> list[int]:
    """The filter every stage applies to tokenized pairs: the indices of the usable ones, the others counted in
    `skips` under their file:line. A needed response (`responses`) must have tokens. Then by `too_long`:
      "fit"   the pair is about to go through a model (trainers, label.py): its prompt needs a token (an empty
              prompt under a tokenizer without BOS leaves the first response token no context), and a prompt
              too long for max_len loses tokens from the left (exs[i] is replaced by the cut pair); a
              response that alone leaves no room is skipped;
      "drop"  prepare's length filter (the paper's): prompt + the longer response must fit max_len, or the
              pair is dropped and counted as a documented policy (--strict does not apply to it).
    """
    kept = []
    for i, (e, loc) in enumerate(zip(exs, locs)):
        if e.get("skip"):  # a conversation the chat template cannot render as prompt + responses
            skips.add(e["skip"], loc)
        elif any(not e[f"{k}_ids"] for k in responses):
            skips.add("a response has no tokens", loc)
        elif too_long == "drop":
            if len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) > max_len:
                skips.add(f"longer than --max-len {max_len}", loc, policy=True)
            else:
                kept.append(i)
        elif not e["prompt_ids"]:
            skips.add("the prompt has no tokens (and the tokenizer adds no BOS)", loc)
        elif (f := fit_pair(e, max_len)) is None:
            skips.add(f"a response alone does not fit --max-len {max_len}", loc)
        else:
            exs[i] = f
            kept.append(i)
    return kept


def in_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 in batches of similar length, longest first (less padding). Fixed by the
    data alone, so the work, and every number in it, is the same for any number of processes and across a
    resumed run."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + size] for s in range(0, len(order), size)]


def pad_id(tok) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (padding is masked either way)."""
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return t


# ----------------------------------------------------------------------------------------------------------
# pairs in a labeler's order (label.py, judge.py)


def swap_pair(pair: dict) -> dict:
    """The pair with chosen and rejected exchanged, *_chosen / *_rejected fields (the synthetic world's gold
    rewards, say) following their response."""
    out = {}
    for key, v in pair.items():
        if key in ("chosen", "rejected"):
            v = pair["rejected" if key == "chosen" else "chosen"]
        elif key.endswith("_chosen"):
            v = pair.get(key[:-len("_chosen")] + "_rejected", v)
        elif key.endswith("_rejected"):
            v = pair.get(key[:-len("_rejected")] + "_chosen", v)
        out[key] = v
    return out


def relabeled_row(pair: dict, keep: bool, reward_in_chosen: float, reward_in_rejected: float) -> dict:
    """A pair in a labeler's order (label.py's output row): chosen = the labeler's choice (keep: the input's
    chosen), its rewards, human_agrees = keep, then every other input field (swap_pair when not keep)."""
    p = pair if keep else swap_pair(pair)
    row = {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
           "chosen_reward": reward_in_chosen if keep else reward_in_rejected,
           "rejected_reward": reward_in_rejected if keep else reward_in_chosen, "human_agrees": keep}
    row.update((k, v) for k, v in p.items() if k not in row)
    return row
