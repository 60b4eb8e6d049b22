"""Preference data: sources, the HH-RLHF dialogue split, tokenization, the filter every stage applies.

A pair is {"prompt": str, "chosen": str, "rejected": str}; chosen and rejected hold the responses only.
A row that cannot be represented is skipped and counted with its file:line (Skips), or with --strict raises.

Tokenization, one convention everywhere (docs/data.md says why):
    prompt_ids   = tokenizer(prompt).input_ids                 (the tokenizer's own special tokens, e.g. BOS)
    response_ids = tokenizer(prompt + response).input_ids[len(prompt_ids):] + [eos]   when prompt_ids is a
                   prefix of the joint tokenization (the usual case), else
                   tokenizer(response, add_special_tokens=False).input_ids + [eos]   (counted as a fallback)
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import wlt
from lib.console import log, progress
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
            raise wlt.WltError(f"{loc}: {reason} (--strict turns skips into errors)")
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


def row_to_pair(row: dict, loc: str, skips: Skips) -> dict | None:
    """One source row -> a pair, or a counted skip. Layouts (detected per row):
    {"prompt", "chosen", "rejected"}: pair form (the project's own, Dahoas/full-hh-rlhf, TL;DR);
    {"chosen", "rejected"} without "prompt": raw HH-RLHF dialogues, split by split_hh."""
    for k in ("chosen", "rejected"):
        if k not in row:
            skips.add(f'missing field "{k}"', loc)
            return None
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
    if chosen == "" or rejected == "":
        skips.add("empty response", loc)
        return None
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for k, v in row.items():  # keep extra fields a producer added (e.g. rewards written by label.py), except
        if k not in pair and k != "response":  # Dahoas/full-hh-rlhf's "response", a copy of "chosen"
            pair[k] = v
    return pair


def collect_pairs(numbered_rows, origin: str, skips: Skips, pairs: list, locs: list) -> None:
    """Append the pair of each (line_number, row) to `pairs` and its "origin:line" to `locs`; rows that
    cannot be represented are counted in `skips`."""
    for i, row in numbered_rows:
        p = row_to_pair(row, f"{origin}:{i}", skips)
        if p is not None:
            pairs.append(p)
            locs.append(f"{origin}:{i}")


def read_pairs(path: str, skips: Skips | None = None, locs: list | None = None) -> list[dict]:
    """Read a pair file (.jsonl or .jsonl.gz, any layout row_to_pair accepts). Bad JSON is an error naming
    file:line; unrepresentable rows are counted in `skips` (or raise under skips.strict). If `locs` is a
    list, the "file:line" of each returned pair is appended to it (for later skips, e.g. too long)."""
    pairs = []
    collect_pairs(iter_jsonl(path), path, skips if skips is not None else Skips(), pairs,
                  locs if locs is not None else [])
    return pairs


def _local_source_files(path: str) -> dict[str, list[str]]:
    """Files of a local source by split. A file: everything is 'train'. A folder: every .jsonl, .jsonl.gz or
    .parquet below it whose name, or else whose parent folder's name, starts with train or test (the hub's
    harmless-base/train.jsonl.gz, data/train-0000.parquet and train/0000.parquet layouts)."""
    exts = (".jsonl", ".jsonl.gz", ".parquet")
    if os.path.isfile(path):
        return {"train": [path], "test": []}
    if not os.path.isdir(path):
        raise wlt.WltError(f"{path}: no such file or folder (sources: hh-rlhf, tldr, synthetic, or a local path)")
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
        raise wlt.WltError(f"{path}: no train*/test* .jsonl, .jsonl.gz or .parquet files in this folder")
    return out


def _file_rows(path: str):
    """(line_number, row) pairs of a .jsonl(.gz) or .parquet file."""
    if path.endswith(".parquet"):
        import datasets  # pyarrow comes with it
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
        for i, row in enumerate(ds, 1):
            yield i, row
    else:
        yield from iter_jsonl(path)


def load_source(src: str, skips: Skips, locs: dict | None = None) -> dict[str, list[dict]]:
    """Load a preference source into {"train": [pairs], "test": [pairs]} (test may be empty). If `locs` is
    given, locs[split] receives the "file:line" of each returned pair, in the same order.

    src: "hh-rlhf" (hub Anthropic/hh-rlhf), "tldr" (hub CarperAI/openai_summarize_comparisons), or a local
    file/folder in any of their layouts or in pair form. Folders with another schema are skipped with a
    message (e.g. hh-rlhf's red-team-attempts). The synthetic world is made by lib/synthetic.py.
    """
    out = {"train": [], "test": []}
    locs = locs if locs is not None else {}
    for split in out:
        locs.setdefault(split, [])
    if src in ("hh-rlhf", "tldr") and not os.path.exists(src):
        name = {"hh-rlhf": "Anthropic/hh-rlhf", "tldr": "CarperAI/openai_summarize_comparisons"}[src]
        try:
            import datasets
            ds = datasets.load_dataset(name)
        except Exception as e:  # offline, no access, ...
            raise wlt.WltError(f"could not load {name} from the hub ({type(e).__name__}); "
                               f"download it elsewhere and pass its local folder or file to --data") from None
        for split, rows in ds.items():
            if split in out:  # TL;DR's valid1/valid2 are not used
                collect_pairs(enumerate(rows, 1), f"{name}/{split}", skips, out[split], locs[split])
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
            collect_pairs(itertools.chain([first], rows), path, skips, out[split], locs[split])
    return out


# ----------------------------------------------------------------------------------------------------------
# pairs -> token ids


def tokenize_pairs(tok, pairs: list[dict], batch: int = 512, desc: str = "tokenize") -> tuple[list[dict], int]:
    """Tokenize pairs with the convention above. Returns ([{"prompt_ids", "chosen_ids", "rejected_ids"}],
    number of responses that needed the fallback, also reported under `desc`). Response ids include the EOS
    id; a response with no token before EOS gets an empty list (the caller skips it)."""
    eos = tok.eos_token_id
    if eos is None:
        raise wlt.WltError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no EOS token; set one")
    out, fallbacks = [], 0
    bar = progress(len(pairs), desc, "pair") if len(pairs) >= 4 * batch else None
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        p_ids = tok([p["prompt"] for p in chunk]).input_ids
        enc = {}
        for k in ("chosen", "rejected"):
            enc[k] = tok([p["prompt"] + p[k] for p in chunk]).input_ids
        for j, p in enumerate(chunk):
            row = {"prompt_ids": list(p_ids[j])}
            for k in ("chosen", "rejected"):
                joint = enc[k][j]
                n = len(p_ids[j])
                if joint[:n] == p_ids[j]:
                    r = list(joint[n:])
                else:
                    fallbacks += 1
                    r = tok(p[k], add_special_tokens=False).input_ids
                row[f"{k}_ids"] = r + [eos] if r else []
            out.append(row)
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
        if any(not e[f"{k}_ids"] for k in responses):
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
