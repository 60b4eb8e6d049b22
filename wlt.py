"""wlt: the library behind "Your Weak LLM is Secretly a Strong Teacher for Alignment" (Tao & Li, ICLR 2025).

Everything the scripts share lives here, in the order a reader meets it in the pipeline:

    1. small utilities (rank-0 logging, atomic writes, clear errors)
    2. data: sources (HH-RLHF, TL;DR, pair .jsonl, the synthetic world), the HH dialogue split, reading pairs
    3. tokenization and collation (one convention everywhere, see tokenize_pair)
    4. the math: response_logps (the log-prob kernel), implicit_reward (Eq. 5), dpo_loss (DPO / cDPO / IPO /
       hinge), sft_loss
    5. LoRA written in torch, its PEFT-compatible adapter files and the merge
    6. model loading, devices, FSDP2 sharding and full-state-dict saving
    7. the synthetic world (offline default): digits to sort, exact gold reward, Bradley-Terry "humans"
    8. `python wlt.py prepare ...`: materialise a run's data splits and config.json

Paper equations referred to below: Tao & Li (2025) Eq. 4 (teacher DPO on D_l), Eq. 5 (weak label reward
r(x, y) = beta * log(pi_w(y|x) / pi_ref(y|x))), Eq. 6 (student DPO on weakly labeled D_u); Rafailov et al.
(2023, "DPO") Eq. 5 (implicit reward) and Eq. 7 (the DPO loss).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # label value for positions that are not response tokens (prompt and padding)


# ----------------------------------------------------------------------------------------------------------
# 1. utilities


class WltError(Exception):
    """A user-facing error: the scripts print its message on one line and exit 1, without a traceback."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def log(*args) -> None:
    """Print on global rank 0 only (every rank runs the same script under torchrun)."""
    if rank() == 0:
        print(*args, flush=True)


def one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line (library errors often span several), shortened to `limit`."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def run_main(main) -> None:
    """Run a script's main(); a WltError becomes a one-line message and exit code 1."""
    try:
        main()
    except WltError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def atomic_write(path: str, write_fn) -> None:
    """Write a file through `write_fn(tmp_path)` then rename, so a reader never sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
    atomic_write(path, w)


def write_text(path: str, text: str) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, w)


def write_jsonl(path: str, rows) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    atomic_write(path, w)


def open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def iter_jsonl(path: str):
    """Yield (line_number, row) for each non-blank line; a malformed line is an error naming file:line."""
    if not os.path.isfile(path):
        raise WltError(f"{path}: no such file")
    with open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise WltError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise WltError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


# ----------------------------------------------------------------------------------------------------------
# 2. data
#
# A pair is {"prompt": str, "chosen": str, "rejected": str}; chosen/rejected hold the responses only.
# Rows that cannot be represented are skipped and counted (with file:line), or, with strict=True, raise.


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
    """Turn one source row into a pair, or count a skip. Layouts (detected per row):
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
    message (e.g. hh-rlhf's red-team-attempts). The synthetic world is made by make_synthetic_pairs.
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
            raise WltError(f"could not load {name} from the hub ({type(e).__name__}); "
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
# 3. tokenization and collation
#
# prompt_ids   = tokenizer(prompt).input_ids                (the tokenizer's own special tokens, e.g. BOS)
# response_ids = tokenizer(prompt + response).input_ids[len(prompt_ids):] + [eos]   when prompt_ids is a
#                prefix of the joint tokenization (the usual case), else
#                tokenizer(response, add_special_tokens=False).input_ids + [eos]   (counted as a fallback).
# Joint first because SentencePiece tokenizers prepend a space marker to a text tokenized alone.


def tokenize_pairs(tok, pairs: list[dict], batch: int = 512, desc: str = "tokenize") -> tuple[list[dict], int]:
    """Tokenize pairs with the convention above. Returns ([{"prompt_ids", "chosen_ids", "rejected_ids"}],
    number of responses that needed the fallback, also reported under `desc`). Response ids include the EOS
    id; a response with no token before EOS gets an empty list (the caller skips it)."""
    eos = tok.eos_token_id
    if eos is None:
        raise WltError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no EOS token; set one")
    out, fallbacks = [], 0
    from tqdm import tqdm
    for s in tqdm(range(0, len(pairs), batch), desc=desc, disable=rank() != 0 or len(pairs) < 4 * batch):
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


def pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return t


def pad_batch(seqs: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention_mask), both [B, max length]: padded on the right, or on the left so that
    every sequence ends in the last column (prompts continued by a KV cache)."""
    B, T = len(seqs), max(map(len, seqs))
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def collate(seqs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt_ids, response_ids) sequences into input_ids / attention_mask / labels [B, T].
    labels = input_ids on response tokens and IGNORE (-100) on prompt and padding."""
    T = max(len(p) + len(r) for p, r in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(exs: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """A DPO batch: chosen sequences then rejected sequences, [2B, T], so both go through one forward."""
    seqs = [(e["prompt_ids"], e["chosen_ids"]) for e in exs] + [(e["prompt_ids"], e["rejected_ids"]) for e in exs]
    return collate(seqs, pad)


# ----------------------------------------------------------------------------------------------------------
# 4. the math


# The log-prob kernel. The textbook version projects every position onto the vocabulary, [B, T, V] fp32 logits,
# then a log_softmax of the same size (and, in training, gradients of both): with V ~ 50k that is most of the
# memory, and the prompt positions (~70% of HH-RLHF tokens) pay for a projection nobody uses. Here the
# model's body runs as usual and only the hidden states that predict a response token go to the head, in
# chunks, inside an autograd function that recomputes each chunk's logits in backward: no [B, T, V] or
# [N, V] tensor exists at any time, only [chunk, V].

LOGPS_CHUNK = 2 ** 23  # elements of the largest logits block, [chunk rows, V] (32 MB in fp32)

# Families whose causal-LM forward is  logits = post(lm_head(base_model(...).last_hidden_state)), with post
# one of: None, ("softcap", config key) -> c * tanh(z / c), ("mul", key) -> z * s, ("div", key) -> z / s.
# Checked against the transformers source; any other model_type takes the plain path (one warning).
HEAD_POST = {t: None for t in ("opt", "gpt2", "gpt_neox", "gpt_neo", "gptj", "llama", "mistral", "mixtral",
                                 "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "smollm3", "starcoder2")}
HEAD_POST.update({"gemma2": ("softcap", "final_logit_softcapping"),
                  "gemma3_text": ("softcap", "final_logit_softcapping"),
                  "cohere": ("mul", "logit_scale"), "granite": ("div", "logits_scaling")})
# Families where the prompt may be run once and its KV cache shared by both responses (position ids passed
# explicitly, tested against the unshared computation). Sliding-window / hybrid caches (Gemma-2/3) are not.
SHARE_PROMPT = {"opt", "gpt2", "gpt_neox", "gpt_neo", "llama", "mistral", "qwen2", "qwen3", "gemma"}

_warned: set = set()


def head_of(model) -> dict | None:
    """What the kernel needs from a model's output head: {"weight": [V, H], "bias": [V] or None, "scale",
    "softcap"}; None for a family outside HEAD_POST (plain path)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if kind not in HEAD_POST or not isinstance(head, nn.Linear):
        if kind not in _warned:
            _warned.add(kind)
            log(f"warning: model type {kind!r} is not known to the memory-lean log-prob kernel; using the plain "
                f"path (full [B, T, V] logits)")
        return None
    post, scale, softcap = HEAD_POST[kind], 1.0, None
    if post is not None:
        value = getattr(cfg, post[1], None)
        if post[0] == "softcap":
            softcap = value
        elif value is not None:
            scale = float(value) if post[0] == "mul" else 1.0 / float(value)
    return {"weight": head.weight, "bias": head.bias, "scale": scale, "softcap": softcap}


def _chunk_logits(h: torch.Tensor, weight, bias, scale: float, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, H] -> (z, u): fp32 logits z = post(u) and u = scale * (h W^T + b), both [n, V]."""
    u = F.linear(h, weight, bias).float()
    if scale != 1.0:
        u = u * scale
    z = softcap * torch.tanh(u / softcap) if softcap else u
    return z, u


class _TokenLogps(torch.autograd.Function):
    """log softmax(post(scale * (h W^T + b)))[target] per row, chunk by chunk (see token_logps)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, bias, targets, scale, softcap, rows):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):
            z, _ = _chunk_logits(h[s:s + rows], weight, bias, scale, softcap)
            out[s:s + rows] = z.gather(1, targets[s:s + rows, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.scale, ctx.softcap, ctx.rows = scale, softcap, rows
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        h, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for s in range(0, h.shape[0], ctx.rows):
            hs, g = h[s:s + ctx.rows], grad_out[s:s + ctx.rows].float()
            z, _ = _chunk_logits(hs, weight, bias, ctx.scale, ctx.softcap)
            # d out / d z = onehot(target) - softmax(z), times the incoming gradient
            dz = torch.softmax(z, dim=-1).mul_(-g[:, None])
            dz.scatter_add_(1, targets[s:s + ctx.rows, None], g[:, None])
            if ctx.softcap:  # z = c tanh(u / c)  ->  dz/du = 1 - (z / c)^2
                dz.mul_(1 - (z / ctx.softcap) ** 2)
            if ctx.scale != 1.0:
                dz.mul_(ctx.scale)
            if need_h:
                gh[s:s + ctx.rows] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                gw += dz.t().to(hs.dtype) @ hs
            if need_b:
                gb += dz.sum(0)
        return (gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None,
                None, None, None, None)


def token_logps(hidden: torch.Tensor, head: dict, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """log p(target | hidden) for N selected positions: hidden [N, H] (each the state that predicts its
    target), targets [N] token ids -> [N] fp32, with p = softmax(post(scale * (hidden W^T + b))) the model's
    own output distribution (head_of). Exact, not an approximation: the same numbers as a full log_softmax,
    computed [chunk / V rows, V] at a time, forward and backward."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    rows = max(1, (chunk or LOGPS_CHUNK) // head["weight"].shape[0])
    return _TokenLogps.apply(hidden, head["weight"], head["bias"], targets, head["scale"], head["softcap"], rows)


def _plain_response_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """The textbook kernel (full [B, T, V] logits): the fallback for families outside HEAD_POST."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (targets != IGNORE)).sum(-1)


def _summed_logps(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, head: dict) -> torch.Tensor:
    """pred [B, T, H]: the hidden state that predicts targets [B, T] at each position; mask [B, T] bool: the
    response tokens. Returns [B]: the summed log-probs of the masked targets (only those reach the head)."""
    rows, cols = mask.nonzero(as_tuple=True)
    lp = token_logps(pred[rows, cols], head, targets[rows, cols])
    return torch.zeros(pred.shape[0], dtype=torch.float32, device=lp.device).index_add(0, rows, lp)


def _lean_response_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    head = head_of(model)
    if head is None:
        return _plain_response_logps(model, input_ids, attention_mask, labels)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]                     # position t predicts token t + 1
    return _summed_logps(hidden[:, :-1], targets, targets != IGNORE, head)


def _run_inside_fsdp(model, fn, *args):
    """Run fn(model, *args) as a forward of the model. Under FSDP2 the root unit's parameters (embeddings,
    final norm, output head) are gathered only around a registered forward method, and the kernel reaches
    the head after the body has run; shard_model registers `wlt_forward` for this (a no-op elsewhere)."""
    fwd = getattr(model, "wlt_forward", None)
    return fwd(fn, *args) if fwd is not None else fn(model, *args)


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token | everything before it) over the response tokens of each sequence.

    input_ids, attention_mask, labels: [B, T] (labels = IGNORE on prompt and padding). Returns [B] fp32.
    This is log pi(y|x) in DPO Eq. 7 and in the weak-label reward of Eq. 5 (Tao & Li): no length
    normalisation, EOS included. Log-softmax runs in fp32 whatever the model's dtype (fp16/bf16 log-probs
    lose precision over hundreds of tokens). Only response positions are projected onto the vocabulary,
    in chunks (token_logps); families outside HEAD_POST take the plain full-logits path.
    """
    return _run_inside_fsdp(model, _lean_response_logps, input_ids, attention_mask, labels)


def _shared_pair_logps(model, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
                       pad: int) -> torch.Tensor:
    head = head_of(model)
    dev = head["weight"].device
    B = len(prompts)
    # 1. the prompts, left-padded so that every prompt ends in the last column, once per pair
    ids, pmask = (t.to(dev) for t in pad_batch(prompts, pad, left=True))
    pos = (pmask.cumsum(-1) - 1).clamp(min=0)  # explicit positions: left padding must not shift them
    out = model.base_model(input_ids=ids, attention_mask=pmask, position_ids=pos, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)           # rows: pair 0 chosen, pair 0 rejected, pair 1 chosen, ...
    # 2. both responses of every pair on top of its cached prompt, right-padded
    rids, rmask = (t.to(dev) for t in pad_batch([r for pair in zip(chosen, rejected) for r in pair], pad))
    rpos = pmask.sum(-1).repeat_interleave(2)[:, None] + torch.arange(rids.shape[1], device=dev)
    hid = model.base_model(input_ids=rids, attention_mask=torch.cat([pmask.repeat_interleave(2, 0), rmask], 1),
                           position_ids=rpos, past_key_values=cache, use_cache=True).last_hidden_state
    # 3. response token j is predicted by the last prompt state (j = 0) or by response state j - 1
    pred = torch.cat([out.last_hidden_state[:, -1:].repeat_interleave(2, 0), hid[:, :-1]], dim=1)  # [2B, R, H]
    return _summed_logps(pred, rids, rmask.bool(), head).view(B, 2)


def _pair_logps(model, exs: list[dict], pad: int, share: bool) -> torch.Tensor:
    if share:
        return _shared_pair_logps(model, [e["prompt_ids"] for e in exs], [e["chosen_ids"] for e in exs],
                                  [e["rejected_ids"] for e in exs], pad)
    dev = next(model.parameters()).device
    b = {k: v.to(dev) for k, v in collate_pairs(exs, pad).items()}
    return torch.stack(_lean_response_logps(model, **b).chunk(2), dim=-1)


def can_share_prompt(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in SHARE_PROMPT and head_of(model) is not None


def pair_logps(model, exs: list[dict], pad: int, share_prompt: bool | None = None) -> torch.Tensor:
    """[B, 2] log pi(chosen | x), log pi(rejected | x) for tokenized pairs (prompt_ids, chosen_ids,
    rejected_ids; ids as tokenize_pairs makes them). With share_prompt (default: when the family allows it,
    SHARE_PROMPT) the prompt runs once and its KV cache serves both responses: per pair P + Rc + Rr tokens
    through the body instead of 2P + Rc + Rr. The same numbers as response_logps on collate_pairs (up to
    float rounding), with or without gradients."""
    if share_prompt is None:
        share_prompt = can_share_prompt(model)
    elif share_prompt and not can_share_prompt(model):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise WltError(f"prompt sharing is not supported for model type {kind!r} (supported: "
                       f"{', '.join(sorted(SHARE_PROMPT))}); use --share-prompt off or auto")
    return _run_inside_fsdp(model, _pair_logps, exs, pad, share_prompt)


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO implicit reward, and the weak teacher's label reward (Tao & Li Eq. 5; DPO Eq. 5):
    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)). policy_logps, ref_logps: [B] summed response
    log-probs (response_logps). Returns [B]. (The partition term beta * log Z(x) is the same for both
    responses of a prompt, so it cancels in every comparison and is left out.)"""
    return beta * (policy_logps - ref_logps)


def weak_labels(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """Which response the weak teacher prefers (Tao & Li section 3.2, after Eq. 5): [B] bool, True when the
    input's "chosen" response has the higher reward. Inputs: [B] rewards; tie_break: [B] bool, the answer on
    exact ties. It must not be the input order: that order is the human label, and a teacher that cannot tell
    two responses apart (pi_w == pi_ref, say) would otherwise copy the human labels."""
    return torch.where(chosen_rewards == rejected_rewards, tie_break, chosen_rewards > rejected_rewards)


def text_tie_break(chosen: str, rejected: str) -> bool:
    """The answer to an exact tie between two responses (weak_labels' tie_break): a fixed hash of the two texts,
    unrelated to their order in the input, which is the human label."""
    return hashlib.sha256((chosen + "\0" + rejected).encode()).digest()[0] < 128


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


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference losses on summed response log-probs. All inputs [B]; returns (losses [B],
    chosen_rewards [B], rejected_rewards [B]); rewards are detached.

    Implicit reward (DPO Eq. 5; Tao & Li Eq. 5):  r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).
    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))   (so r_w - r_l = beta * h)

    sigmoid (DPO Eq. 7; Tao & Li Eq. 4 and 6):  -log sigmoid(beta h)
        with label_smoothing eps (conservative DPO, labels flipped with probability eps):
        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo (Azar et al. 2023, the empirical IPO loss, with their tau = beta):  (h - 1 / (2 beta))^2
    hinge (the SLiC-HF calibration loss of Zhao et al. 2023, on the DPO log-ratio):  max(0, 1 - beta h)
    """
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type!r}")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (sigmoid, ipo, hinge)")
    chosen_rewards = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(logps: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """SFT loss: summed response-token NLL divided by the number of response tokens of the *global* batch.
    logps: [B] summed response log-probs (response_logps) of this micro-batch; num_tokens: response tokens
    in the whole global batch, so that micro-batches and ranks add up to the plain token mean."""
    return -logps.sum() / num_tokens


# ----------------------------------------------------------------------------------------------------------
# 5. LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with B zero-initialised so a fresh adapter == base.

# Default target modules per model family (config.model_type), matched by name suffix as PEFT does:
# every linear map of attention and MLP ("all-linear"), the output head and embeddings excluded.
LORA_TARGETS = {
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: weights stored transposed (fan_in_fan_out)
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
}
for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2"):
    LORA_TARGETS[_t] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear, or GPT-2's transposed Conv1D) plus a low-rank update.

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T,   A: [rank, in], B: [out, rank], B = 0 at init.
    The base `weight` and `bias` are the original Parameters, kept under their original names so the
    model's state dict keeps its HF keys; the adapter adds `<path>.lora_A.weight` / `<path>.lora_B.weight`.
    `disabled = True` turns the update off: the same module then computes the base layer (pi_ref).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # transformers' Conv1D: weight is [in, out]
        self.weight = base.weight
        self.bias = base.bias
        in_f, out_f = (self.weight.shape if self.fan_in_fan_out else self.weight.shape[::-1])
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Linear(in_f, rank, bias=False, device=self.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_f, bias=False, device=self.weight.device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_lora()

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        y = F.linear(x, w, self.bias)
        if self.disabled:
            return y
        a, b = self.lora_A.weight, self.lora_B.weight
        update = F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scaling
        return y + update.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight update of a LoRA pair, in the base weight's layout: scaling * B @ A ([out, in]), transposed
    for Conv1D ([in, out])."""
    d = (lora_B.float() @ lora_A.float()) * scaling
    return d.t() if fan_in_fan_out else d


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets: list[str] | None = None):
    """Replace the target linear layers of `model` by LoRALinear, freeze everything else. Returns the model.

    targets: module-name suffixes (PEFT's matching rule); default LORA_TARGETS[config.model_type].
    The adapter settings are recorded on the model (model.wlt_lora) for saving and merging.
    Seed identically on every rank before calling it: A is random, and FSDP2 does not broadcast weights.
    """
    from transformers.pytorch_utils import Conv1D
    if targets is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in LORA_TARGETS:
            raise WltError(f"no default LoRA targets for model type {mt!r}; pass --lora-targets "
                           f"(known: {', '.join(sorted(LORA_TARGETS))})")
        targets = LORA_TARGETS[mt]
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = []
    for name, module in list(model.named_modules()):
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
        replaced.append(name)
    if not replaced:
        raise WltError(f"LoRA targets {targets} match no linear layer of this model")
    fan = {n: model.get_submodule(n).fan_in_fan_out for n in replaced}  # per module: Conv1D or nn.Linear
    model.wlt_lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
                      "fan_in_fan_out": any(fan.values()), "modules": fan}
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Within this block every LoRALinear computes its base layer only: the same model acts as pi_ref."""
    mods = lora_modules(model)
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (nn.Linear or Conv1D), in place.
    Returns the model, now a plain HF model with the adapter's effect built in."""
    from transformers.pytorch_utils import Conv1D
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        w = module.weight
        w += lora_delta(module.lora_A.weight, module.lora_B.weight, module.scaling, module.fan_in_fan_out).to(w.dtype)
        if module.fan_in_fan_out:
            plain = Conv1D(module.out_features, module.in_features)
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight = w
        plain.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    if hasattr(model, "wlt_lora"):
        del model.wlt_lora
    return model


def split_lora_state_dict(sd: dict, lora_cfg: dict) -> tuple[dict, dict]:
    """Split a full state dict of a LoRA model into (merged base state dict, PEFT adapter state dict).
    lora_cfg: model.wlt_lora (add_lora). The adapter keys follow PEFT's on-disk layout:
    base_model.model.<module path>.lora_A.weight."""
    merged, adapter = {}, {}
    scaling = lora_cfg["lora_alpha"] / lora_cfg["r"]
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            adapter["base_model.model." + k] = v.contiguous()
        else:
            merged[k] = v
    for path, fan in lora_cfg["modules"].items():  # fan: the layer stores its weight transposed (Conv1D)
        a, b = sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"]
        w = merged[f"{path}.weight"]
        merged[f"{path}.weight"] = (w.float() + lora_delta(a, b, scaling, fan)).to(w.dtype)
    return merged, adapter


def save_adapter(out_dir: str, adapter_sd: dict, lora_cfg: dict, base_model: str) -> None:
    """Write adapter/adapter_config.json + adapter/adapter_model.safetensors in the layout PEFT reads."""
    from safetensors.torch import save_file
    d = os.path.join(out_dir, "adapter")
    os.makedirs(d, exist_ok=True)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora_cfg["r"], "lora_alpha": lora_cfg["lora_alpha"], "lora_dropout": lora_cfg["lora_dropout"],
        "target_modules": lora_cfg["target_modules"], "fan_in_fan_out": lora_cfg["fan_in_fan_out"],
        "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    atomic_write(os.path.join(d, "adapter_model.safetensors"),
                 lambda tmp: save_file({k: v.contiguous() for k, v in adapter_sd.items()}, tmp,
                                       metadata={"format": "pt"}))
    write_json(os.path.join(d, "adapter_config.json"), cfg)


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Put a saved adapter (PEFT layout) on a base model: add_lora with its settings, then load A and B."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise WltError(f"{adapter_dir}: no adapter_config.json")
    try:
        cfg = json.load(open(cfg_path))
        r, alpha, targets = cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WltError(f"{cfg_path}: not a LoRA adapter config ({one_line(e)})") from None
    if not isinstance(targets, list):  # PEFT also allows a regex string; this project writes lists
        raise WltError(f"{cfg_path}: target_modules must be a list of module names, got {targets!r}")
    add_lora(model, r, alpha, 0.0, targets)
    sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    own = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    expected = {k for k, _ in model.named_parameters() if ".lora_A." in k or ".lora_B." in k}
    missing, unexpected = sorted(expected - own.keys()), sorted(own.keys() - expected)
    if missing or unexpected:
        raise WltError(f"{adapter_dir}: adapter does not fit this model "
                       f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
    model.load_state_dict(own, strict=False)  # strict=False: the base weights are not in the adapter
    return model


# ----------------------------------------------------------------------------------------------------------
# 6. models, devices, FSDP2


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def autocast(dev: torch.device, dtype: str = "auto"):
    """bf16 autocast on CUDA (the default there), plain fp32 on CPU: bf16 matmuls on CPU are ~300x slower."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and dev.type == "cuda")
    if use_bf16:
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_model_dir(path: str) -> None:
    """A clear error for a local model folder that is missing or has no weights (hub names pass through)."""
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1):
        raise WltError(f"{path}: no such model folder")
    if os.path.isdir(path):
        names = os.listdir(path)
        if "config.json" not in names:
            raise WltError(f"{path}: not a model folder (no config.json)")
        if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for n in names):
            raise WltError(f"{path}: model folder without weights (no *.safetensors)")


def load_model(path: str, trust_remote_code: bool = False):
    """Load a causal LM in fp32 (master weights; bf16 compute comes from autocast / FSDP mixed precision)."""
    from transformers import AutoModelForCausalLM
    check_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise WltError(f"cannot load model {path!r}: {one_line(e)}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        raise WltError(f"cannot load tokenizer {path!r}: {one_line(e)}") from None


def init_distributed() -> None:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU). A plain `python` run is one process."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        torch.distributed.init_process_group(backend)


def all_reduce_sum(t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """Sum (or op="MAX": the largest) of a tensor over the ranks; returned where it came from (nccl reduces
    CUDA tensors only)."""
    if world_size() > 1:
        r = t.to(device())
        torch.distributed.all_reduce(r, op=getattr(torch.distributed.ReduceOp, op))
        t = r.to(t.device)
    return t


def gather_dicts(d: dict) -> dict:
    """Merge every rank's dict on rank 0 (other ranks get {}): how sharded labeling and evaluation collect
    their results. Values must be picklable; a collective, so every rank must call it."""
    if world_size() == 1:
        return d
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, d)
    if rank() != 0:
        return {}
    out = {}
    for p in parts:
        out.update(p)
    return out


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the longest nn.ModuleList whose children share one class."""
    best = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def shard_model(model: nn.Module, dev: torch.device) -> nn.Module:
    """FSDP2: one fully_shard unit per transformer block plus the root. bf16 parameters with fp32 gradient
    reduction on CUDA; plain fp32 on CPU. Call after every rank built identical weights (same seed)."""
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dev.type == "cuda" \
        else MixedPrecisionPolicy()
    from torch.distributed.fsdp import register_fsdp_forward_method
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # the log-prob kernel runs the body, then reaches into the output head: both inside one FSDP forward
    model.wlt_forward = lambda fn, *args: fn(model, *args)
    register_fsdp_forward_method(model, "wlt_forward")
    return model


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state dict on CPU, on rank 0 (other ranks get {}). Under FSDP2 this is a collective:
    every rank must call it."""
    if world_size() > 1:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if rank() == 0 else {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def unique_state_keys(model: nn.Module) -> set:
    """State-dict keys without tied duplicates (e.g. lm_head.weight tied to the input embedding)."""
    keys = {n for n, _ in model.named_parameters()}
    keys |= {n for n, _ in model.named_buffers()}
    return keys


def save_hf_checkpoint(out_dir: str, sd: dict, model, tokenizer, keep: set | None = None) -> None:
    """Write an HF checkpoint (config.json, generation_config.json, model.safetensors, tokenizer) from a full
    state dict, atomically per file. `keep` drops tied duplicates (unique_state_keys of the unsharded model)."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items() if keep is None or k in keep}
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# 6b. what both trainers share: flags, --run resolution, data, batch plan, optimizer, metrics


def add_train_args(ap: argparse.ArgumentParser, kind: str) -> None:
    """Flags common to train_sft.py and train_dpo.py (names fixed by DESIGN.md)."""
    g = ap.add_argument_group("what to train (either a role with --run, or explicit paths)")
    role = g.add_mutually_exclusive_group()
    role.add_argument("--teacher", action="store_true", help="the weak teacher (small model) of the run")
    role.add_argument("--student", action="store_true", help="the student (bigger model) of the run")
    g.add_argument("--run", default=None, help="run directory made by `wlt.py prepare`; gives model, data, out and defaults")
    g.add_argument("--model", default=None, help="HF model name or folder to start from")
    g.add_argument("--data", default=None, help="pair file (.jsonl: prompt, chosen, rejected)")
    g.add_argument("--out", default=None, help="output folder (HF checkpoint, metrics.jsonl, train_config.json)")
    t = ap.add_argument_group("optimisation")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: SFT 2e-5; DPO 5e-5 with LoRA, 5e-7 full; --run: config.json)")
    t.add_argument("--epochs", type=int, default=1, help="passes over the data (paper: 1)")
    t.add_argument("--batch-size", type=int, default=32 if kind == "sft" else 16,
                   help="global batch in %s over all ranks (paper: SFT 32, DPO 16)" % ("sequences" if kind == "sft" else "pairs"))
    t.add_argument("--micro-batch-size", type=int, default=None,
                   help="per-rank micro-batch; gradients accumulate up to --batch-size (default: no accumulation)")
    t.add_argument("--max-len", type=int, default=512, help="tokens per sequence; longer prompts lose tokens from the left")
    t.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup share of the steps, then cosine to 0")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--seed", type=int, default=0, help="seed of data order and LoRA init (same on every rank)")
    t.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs); the schedule fits them")
    o = ap.add_argument_group("bookkeeping")
    o.add_argument("--eval-pairs", type=int, default=64, help="held-out slice of the data, excluded from training (0: none)")
    o.add_argument("--eval-every", type=int, default=50, help="evaluate the held-out slice every N steps (and at the end)")
    o.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU")
    o.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block's activations in backward instead of storing them "
                        "(less memory, about one more forward of compute); DPO then runs prompts unshared")
    o.add_argument("--resume", action="store_true",
                   help="continue from --out's newest mid-run checkpoint when it was made with the same settings and "
                        "inputs; exit at once if --out holds a finished run with the same settings and inputs")
    o.add_argument("--save-every", type=int, default=100,
                   help="write a mid-run checkpoint (trainable weights, optimizer, scheduler, RNG, step) every N steps (0: never)")
    o.add_argument("--strict", action="store_true", help="turn every skipped row into an error")
    o.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")


def resolve_train_args(ap: argparse.ArgumentParser, script: str, role_paths) -> tuple[argparse.Namespace, dict]:
    """Parse flags; with --run, fill model/data/out from the role and defaults from runs/NAME/config.json.
    Explicit flags always win. role_paths(args) -> dict of model/data/out for the chosen role.
    Returns (args, run settings that are not flags, e.g. DPO's lr_lora / lr_full)."""
    args, _ = ap.parse_known_args()
    extra = {}
    if args.run:
        if not (args.teacher or args.student):
            ap.error("--run needs --teacher or --student")
        role = "teacher" if args.teacher else "student"
        d = run_defaults(args.run, script, role)
        d.update(role_paths(args))
        ap.set_defaults(**{k: v for k, v in d.items() if k in vars(args)})
        extra = {k: v for k, v in d.items() if k not in vars(args)}
    args = ap.parse_args()
    for k in ("model", "data", "out"):
        if getattr(args, k) is None:
            ap.error(f"--{k} is required (or use --teacher/--student with --run)")
    return args, extra


def load_examples(args, tok, kind: str) -> tuple[list[dict], list[dict], dict]:
    """Read and tokenize the pair file; fit to --max-len; carve the held-out slice. Returns (train, eval,
    stats). Skipped rows are counted (or fatal under --strict) and reported."""
    skips, locs = Skips(strict=args.strict), []
    pairs = read_pairs(args.data, skips, locs)
    n_rows = len(pairs) + skips.total()
    if not pairs:
        raise WltError(f"{args.data}: no usable pairs")
    exs, fallbacks = tokenize_pairs(tok, pairs, desc=f"tokenize {args.data}")
    kept = []
    for e, loc in zip(exs, locs):
        need = ("chosen_ids",) if kind == "sft" else ("chosen_ids", "rejected_ids")
        if any(not e[k] for k in need):
            skips.add("a response has no tokens", loc)
            continue
        if not e["prompt_ids"]:  # an empty prompt and no BOS: the first response token has no context
            skips.add("the prompt has no tokens (and the tokenizer adds no BOS)", loc)
            continue
        if kind == "sft":
            e = dict(e, rejected_ids=[])
        f = fit_pair(e, args.max_len)
        if f is None:
            skips.add(f"a response alone does not fit --max-len {args.max_len}", loc)
            continue
        kept.append(f)
    skips.report(args.data)
    order = list(range(len(kept)))
    random.Random(args.seed).shuffle(order)
    n_eval = min(args.eval_pairs, len(kept) // 10)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(kept) if i not in held]
    evals = [kept[i] for i in sorted(held)]
    stats = {"rows": n_rows, "pairs": len(kept), "train": len(train), "eval": len(evals),
             "tokenizer_fallbacks": fallbacks, "skipped": skips.as_dict()}
    log(f"{args.data}: {len(train)} training, {len(evals)} held-out"
        + (f", {skips.total()} skipped" if skips.total() else ""))
    if not train:
        raise WltError(f"{args.data}: nothing left to train on")
    return train, evals, stats


def batch_plan(n: int, batch_size: int, epochs: int, seed: int, max_steps: int = 0) -> list[list[int]]:
    """Global batches of example indices: a fresh seeded permutation per epoch; the last batch of an
    epoch may be smaller (every example is used once per epoch). max_steps > 0 cuts the plan short."""
    plan = []
    for ep in range(epochs):
        order = list(range(n))
        random.Random(seed * 1000 + ep).shuffle(order)
        plan += [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return plan[:max_steps] if max_steps > 0 else plan


def micro_batches(batch: list[int], micro: int) -> list[tuple[list[int], list[float]]]:
    """This rank's share of a global batch (items rank::world_size), cut into micro-batches.

    Every rank gets the same number of micro-batches (FSDP collectives run in every forward); a rank short
    of items pads with a copy of the batch's first item at weight 0, which adds nothing to loss or metrics.
    Returns [(indices, weights)]."""
    W, r = world_size(), rank()
    mine = batch[r::W]
    steps = max(1, math.ceil(math.ceil(len(batch) / W) / micro))
    out = []
    for j in range(steps):
        idx = mine[j * micro:(j + 1) * micro]
        w = [1.0] * len(idx)
        if not idx:
            idx, w = [batch[0]], [0.0]
        out.append((idx, w))
    return out


def sharded_map(n: int, micro: int, fn) -> torch.Tensor:
    """Evaluate fn(indices) -> Tensor[len(indices), k] for items 0..n-1, split over ranks, result on every
    rank as Tensor[n, k] in item order. Ranks run the same number of calls (padding with item 0)."""
    W, r = world_size(), rank()
    per = math.ceil(n / W)
    mine = list(range(r, n, W))
    mine += [0] * (per - len(mine))
    parts = [fn(mine[s:s + micro]).float().cpu() for s in range(0, per, micro)]
    local = torch.cat(parts) if parts else torch.zeros(0, 1)
    if W == 1:
        return local[:n]
    dev = device() if torch.cuda.is_available() else torch.device("cpu")
    gathered = [torch.empty_like(local, device=dev) for _ in range(W)]
    torch.distributed.all_gather(gathered, local.to(dev))
    full = torch.stack([g.cpu() for g in gathered], dim=1).reshape(W * per, -1)  # row r + W*j
    return full[:n]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, args, total_steps: int):
    # FSDP2 keeps the root unit unsharded after a no_grad forward (e.g. DPO's reference pass): its parameters
    # are then plain full tensors that never receive gradients. Reshard so we collect the sharded DTensors.
    if hasattr(model, "reshard"):
        model.reshard()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    warmup = math.ceil(args.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps))
    return params, opt, sched


def clip_grads(params, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (<= 0: no clipping) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


class MetricsLog:
    """metrics.jsonl in the output folder, written by rank 0 only, one JSON object per line."""

    def __init__(self, out_dir: str, start_step: int = 0):
        """start_step > 0 (a resumed run): keep the rows of steps 1..start_step, drop later ones (written after
        the checkpoint the run resumes from), so every step appears exactly once."""
        self.f = None
        if rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "metrics.jsonl")
            keep = []
            if start_step and os.path.isfile(path):
                with open(path) as f:
                    for line in f:
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:  # a line cut by a kill
                            continue
                        if row.get("step", 0) <= start_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
            write_text(path, "".join(keep))  # atomically: a kill here keeps the old file
            self.f = open(path, "a")

    def write(self, row: dict) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def build_model(path: str, dev: torch.device, seed: int, trust_remote_code: bool = False, lora: dict | None = None,
                activation_checkpointing: bool = False) -> tuple[nn.Module, set]:
    """The model a trainer trains, on `dev`; under torchrun sharded with FSDP2. Returns (model, keep) where
    keep = state-dict keys without tied duplicates. lora: add_lora's keyword arguments, or None.

    One process: load the weights, add LoRA (seeded), move to dev. N processes: only rank 0 reads the weights
    (into CPU memory: one copy in the whole job, not one per rank, which is what lets a 7B model start on a
    node of 8 GPUs); every rank builds the same architecture on the meta device (no memory), shards it (one
    FSDP2 unit per block + the root), allocates only its own shards (to_empty) and receives them from rank 0
    (set_model_state_dict with broadcast_from_rank0). Buffers that are not in a state dict (rotary
    frequencies, causal masks) are broadcast too. LoRA weights are drawn once, on rank 0, with the seed of
    the one-process path, and travel with the rest: every rank holds the same adapter, and N processes start
    from exactly the weights of one."""
    set_seed(seed)
    W = world_size()
    full = None
    if W == 1 or rank() == 0:
        full = load_model(path, trust_remote_code)
        if lora:
            set_seed(seed)
            add_lora(full, **lora)
    if W == 1:
        if activation_checkpointing:
            enable_activation_checkpointing(full)
        return full.to(dev), unique_state_keys(full)
    from transformers import AutoConfig, AutoModelForCausalLM
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, StateDictOptions
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, trust_remote_code=trust_remote_code)
        if lora:
            add_lora(model, **lora)
    keep = unique_state_keys(model)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    shard_model(model, dev)
    model.to_empty(device=dev)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    src = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if full is not None:
                buf.copy_(src[name])
            torch.distributed.broadcast(buf, src=0)
    if full is not None:
        model.generation_config = full.generation_config
    del full
    return model, keep


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Keep only each transformer block's input for backward and recompute the block's activations there
    (Chen et al. 2016): activation memory falls from every intermediate of every block to one tensor per block
    plus one block's intermediates, for about one extra forward of compute. Non-reentrant checkpointing keeps
    the RNG state, so dropout draws the same masks in the recomputation. Under FSDP2 the block's parameters
    are gathered again for its backward before the recomputation runs."""
    from torch.utils.checkpoint import checkpoint
    for block in transformer_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def setup_model(args, lora_rank: int = 0, lora_alpha: float = 16.0, lora_dropout: float = 0.0, lora_targets=None):
    """Every rank: the same weights (build_model), optional LoRA, sharded under torchrun.
    Returns (model, tokenizer, device, keep) where keep = state-dict keys without tied duplicates."""
    init_distributed()
    dev = device()
    check_model_dir(args.model)  # before the tokenizer, so a folder without weights is named as such
    tok = load_tokenizer(args.model, args.trust_remote_code)
    lora = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets) if lora_rank > 0 else None
    model, keep = build_model(args.model, dev, args.seed, args.trust_remote_code, lora,
                              getattr(args, "activation_checkpointing", False))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)  # DTensor.numel() is the global size
    n_all = sum(p.numel() for p in model.parameters())
    log(f"model {args.model}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable, "
        f"device {dev}, {world_size()} process(es)")
    return model, tok, dev, keep


def memory_report(model: nn.Module, opt) -> dict:
    """What one rank holds, in MiB, the largest over the ranks: its shards of the parameters and of the
    optimizer state (AdamW moments), counted from the tensors themselves; on CUDA also the allocator's peak.
    Under FSDP2 with N ranks the first two are about 1/N of a one-process run's (recorded in
    train_config.json, checked by the tests). A collective: every rank must call it."""
    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = sum(local_bytes(p) for p in model.parameters())
    optim = sum(local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    vals = all_reduce_sum(torch.tensor([params, optim, torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                                        else 0], dtype=torch.float64), op="MAX")
    mib = [float(v) / 2 ** 20 for v in vals]
    out = {"params_mib_per_rank": mib[0], "optimizer_mib_per_rank": mib[1]}
    if torch.cuda.is_available():
        out["cuda_peak_mib_per_rank"] = mib[2]
    return out


def fingerprint(path: str | None):
    """What identifies an input without reading it: [name, size, mtime] of a file, or of every file in a
    model folder (a retrained upstream stage rewrites its files, so its fingerprint changes)."""
    if not path or not os.path.exists(path):
        return path  # a hub name, or nothing
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.basename(path), st.st_size, st.st_mtime_ns]
    out = []
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f != "metrics.jsonl" and not os.path.relpath(root, path).startswith(CKPT):
                st = os.stat(os.path.join(root, f))
                out.append([os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns])
    return out


def same_settings(marker: str, settings: dict, inputs: dict, ignore=("resume",)) -> bool:
    """True when the completion marker of a stage (a JSON file with "args" and "inputs", written last) records
    the same settings (except `ignore`) and the same input fingerprints: the stage's output is current."""
    try:
        prev = json.load(open(marker))
    except (OSError, json.JSONDecodeError):
        return False
    return prev.get("inputs") == inputs and all(
        prev.get("args", {}).get(k) == v for k, v in settings.items() if k not in ignore)


def begin(args) -> dict | None:
    """Start of a training run. Returns None when --resume finds a finished run in --out with the same
    settings and unchanged inputs (nothing to do). Otherwise removes the previous run's completion marker
    (train_config.json) and adapter/, so a crash can never leave a folder that looks finished, and returns
    the inputs' fingerprints for finish()."""
    init_distributed()
    inputs = {k: fingerprint(getattr(args, k, None)) for k in ("model", "data", "ref")}
    marker = os.path.join(args.out, "train_config.json")
    if args.resume and os.path.isfile(marker):
        if same_settings(marker, vars(args), inputs, ignore=("resume", "save_every")):
            log(f"{args.out}: finished run with the same settings and inputs found; nothing to do (--resume)")
            if rank() == 0:  # a kill inside finish() can leave the last checkpoint behind
                remove_checkpoints(args.out)
            return None
        log(f"{args.out}: settings or inputs changed since the finished run there; training again")
    if rank() == 0:
        if os.path.isfile(marker):
            os.remove(marker)
        shutil.rmtree(os.path.join(args.out, "adapter"), ignore_errors=True)
        if not args.resume:  # a fresh start: an old mid-run checkpoint must not be picked up later
            remove_checkpoints(args.out)
    barrier()
    return inputs


def finish(args, stats: dict, inputs: dict) -> None:
    """Last write of a training run: the resolved settings, data counts and input fingerprints. Its presence
    marks a complete output. The mid-run checkpoint is no longer needed then and is removed."""
    if rank() == 0:
        write_json(os.path.join(args.out, "train_config.json"), {"args": vars(args), "data": stats, "inputs": inputs})
        remove_checkpoints(args.out)
    barrier()


# ----------------------------------------------------------------------------------------------------------
# 6c. mid-run checkpoints: OUT/checkpoint/ holds the newest one
#
#   weights.safetensors  the trainable parameters (with LoRA: the adapter) and the optimizer's per-parameter
#                        state (AdamW moments, step), gathered to rank 0 as full tensors: safetensors, no pickle
#   state.pt             step (= the data position: the batch plan is a pure function of the seed), scheduler,
#                        optimizer hyper-parameters, and the settings + input fingerprints it belongs to
#   rng-RANK.pt          each rank's torch / CUDA / python RNG state (dropout draws)
# Both .pt files hold plain numbers and strings and are read with torch.load(weights_only=True).
# Written to checkpoint.tmp/, then swapped in by renames, so a kill at any moment leaves either the previous
# checkpoint or the new one complete (a kill between the two renames leaves it as checkpoint.old/).

CKPT = "checkpoint"


def remove_dir(path: str) -> None:
    """Delete a folder so that a kill half-way cannot leave a partial copy under its name: rename, then delete."""
    if os.path.isdir(path):
        trash = f"{path}.trash.{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def remove_checkpoints(out_dir: str) -> None:
    """Remove every mid-run checkpoint folder of a training output (newest, previous, half-written)."""
    for d in (CKPT, CKPT + ".old", CKPT + ".tmp"):
        remove_dir(os.path.join(out_dir, d))


REF_LOGPS = "ref_logps.safetensors"


def save_ref_logps(out_dir: str, key: dict, train: torch.Tensor, evals: torch.Tensor) -> None:
    """train_dpo.py's reference log-probs, computed once before the loop: OUT/ref_logps.safetensors with
    "train" [epochs, N_train, 2] (per epoch, per training pair: log pi_ref of chosen, rejected) and "eval"
    [N_eval, 2], plus the settings and input fingerprints they belong to (metadata "key"). Rank 0 writes."""
    if rank() == 0:
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(os.path.join(out_dir, REF_LOGPS), lambda tmp: save_file(
            {"train": train.contiguous(), "eval": evals.contiguous()}, tmp, metadata={"key": json.dumps(key, sort_keys=True)}))
    barrier()


def load_ref_logps(out_dir: str, key: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The cached reference log-probs when they were made with the same key, else (None, None)."""
    from safetensors import safe_open
    path = os.path.join(out_dir, REF_LOGPS)
    try:
        with safe_open(path, "pt") as f:
            if f.metadata().get("key") != json.dumps(json.loads(json.dumps(key)), sort_keys=True):
                log(f"{path}: made with other settings or inputs; computing the reference again")
                return None, None
            train, evals = f.get_tensor("train"), f.get_tensor("eval")
    except Exception as e:  # missing or unreadable (any safetensors error): compute it again
        if os.path.exists(path):
            log(f"{path}: unreadable ({one_line(e)}); computing the reference again")
        return None, None
    log(f"{path}: reference log-probs reused")
    return train, evals


def stop_if_not_finite(what: str, value: float, step: int) -> None:
    """A NaN or infinite loss or gradient norm ends training before the optimizer update of `step`."""
    if not math.isfinite(value):
        raise WltError(f"{what} is {value} at step {step}; stopping before the update, nothing saved from this "
                       f"step (the last checkpoint, if any, is intact)")


def checkpoint_settings(args) -> dict:
    """The settings a checkpoint must share with the run that resumes it (how often it is saved does not matter)."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "save_every")}


def _ckpt_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kw)


def save_checkpoint(out_dir: str, model: nn.Module, opt, sched, step: int, settings: dict, inputs: dict) -> None:
    """Save the training state after `step` optimizer steps. A collective: every rank must call it."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final, tmp, old = (os.path.join(out_dir, d) for d in (CKPT, CKPT + ".tmp", CKPT + ".old"))
    if rank() == 0:
        remove_dir(tmp)
        os.makedirs(tmp)
    barrier()
    msd, osd = get_state_dict(model, opt, options=_ckpt_options(cpu_offload=True))  # full tensors on rank 0
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, f"rng-{rank()}.pt"))
    if rank() == 0:
        tensors = {f"model/{k}": v.contiguous() for k, v in msd.items()}
        for fqn, st in osd["state"].items():
            for name, v in st.items():
                tensors[f"optim/{fqn}/{name}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
        save_file(tensors, os.path.join(tmp, "weights.safetensors"))
        torch.save({"step": step, "sched": sched.state_dict(), "param_groups": osd["param_groups"],
                    "world_size": world_size(), "args": settings, "inputs": inputs}, os.path.join(tmp, "state.pt"))
    barrier()
    if rank() == 0:
        if os.path.isdir(final):
            remove_dir(old)
            os.replace(final, old)
        os.replace(tmp, final)
        remove_dir(old)
    barrier()


def checkpoint_to_resume(out_dir: str, settings: dict, inputs: dict) -> tuple[str | None, int]:
    """(folder, step) of a complete checkpoint in out_dir made with the same settings and inputs, or (None, 0).
    A checkpoint of other settings is removed, so it can never be resumed later by mistake. Every rank calls it."""
    found, step = None, 0
    for d in (CKPT, CKPT + ".old"):
        path = os.path.join(out_dir, d)
        if not all(os.path.isfile(os.path.join(path, f)) for f in ("state.pt", "weights.safetensors")):
            continue
        st = torch.load(os.path.join(path, "state.pt"), weights_only=True)
        if st.get("inputs") == inputs and all(st.get("args", {}).get(k) == v for k, v in settings.items()):
            found, step = path, int(st["step"])
            if st.get("world_size") != world_size():
                log(f"warning: {path} was saved by {st.get('world_size')} process(es), resumed by {world_size()}: "
                    f"the result will not be bit-equal to an uninterrupted run")
        else:
            log(f"{path}: made with other settings or inputs; starting from step 0")
        break
    barrier()  # every rank has read it before it may be removed
    if found is None and rank() == 0:
        remove_checkpoints(out_dir)
    return found, step


def load_checkpoint(path: str, model: nn.Module, opt, sched) -> None:
    """Restore model (trainable parameters), optimizer, scheduler and this rank's RNG from save_checkpoint's
    folder. A collective: every rank must call it."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict
    st = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    msd, state = {}, {}
    for k, v in load_file(os.path.join(path, "weights.safetensors")).items():
        kind, rest = k.split("/", 1)
        if kind == "model":
            msd[rest] = v
        else:
            fqn, name = rest.rsplit("/", 1)
            state.setdefault(fqn, {})[name] = v
    # every rank reads the full tensors and keeps its own shard of them; strict=False: the frozen base weights
    # are not in a checkpoint (they never change)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict={"state": state, "param_groups": st["param_groups"]},
                   options=_ckpt_options(strict=False))
    sched.load_state_dict(st["sched"])
    rng_path = os.path.join(path, f"rng-{rank()}.pt")
    if os.path.isfile(rng_path):  # absent when resuming on more ranks than saved
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    log(f"resumed from {path} at step {st['step']}")


class Partial:
    """Resumable partial results of label.py and evaluate.py: OUT.partial/ beside the output, holding meta.json
    (the settings and inputs the results belong to) and one append-only rank-N.jsonl per process of
    {"k": key, "v": value} lines, flushed as they are made. A rerun with the same settings reads every complete
    line back (a kill can only cut a file's last line, which is skipped) and computes only what is missing;
    other settings discard it. remove() after the final output is written."""

    def __init__(self, out: str, settings: dict):
        self.dir = out + ".partial"
        meta = os.path.join(self.dir, "meta.json")
        settings = json.loads(json.dumps(settings))  # the form it takes on disk
        if rank() == 0:
            try:
                same = json.load(open(meta)) == settings
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                shutil.rmtree(self.dir, ignore_errors=True)
                os.makedirs(self.dir)
                write_json(meta, settings)
        barrier()
        self.done = {}
        for fn in sorted(os.listdir(self.dir)):
            if fn.startswith("rank-") and fn.endswith(".jsonl"):
                with open(os.path.join(self.dir, fn), encoding="utf-8") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                            self.done[rec["k"]] = rec["v"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            continue
        barrier()  # every rank has read the files before any rank appends to them
        path = os.path.join(self.dir, f"rank-{rank()}.jsonl")
        if os.path.isfile(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
        else:
            cut = False
        self.f = open(path, "a", encoding="utf-8")
        if cut:  # the last line was cut by a kill: start a fresh line
            self.f.write("\n")
        if self.done:
            log(f"{self.dir}: resuming with {len(self.done)} finished piece(s) of work")

    def add(self, key: str, value) -> None:
        self.f.write(json.dumps({"k": key, "v": value}) + "\n")
        self.f.flush()

    def remove(self) -> None:
        self.f.close()
        barrier()
        if rank() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


def summary_path(out: str) -> str:
    """label.py's summary beside its output (OUT.jsonl -> OUT.summary.json), written last: its completion marker."""
    return (out[:-len(".jsonl")] if out.endswith(".jsonl") else out) + ".summary.json"


def in_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 in batches of similar length, longest first (less padding). Fixed by the
    data alone, so the work, and every number in it, is the same for any number of processes and across a
    resumed run."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + size] for s in range(0, len(order), size)]


_BATCHES_DONE = 0  # batches finished by this process, over every run_batches call (for fault_point)


def run_batches(batches: list, fn, partial: Partial, tag: str, bar=None) -> dict:
    """Run fn(batch) -> {item: value} over the batches not yet in `partial`, dealt out to the ranks in turn
    (batch k of the remaining list to rank k mod W), recording each finished batch. The batches are fixed by
    the caller, so any number of processes and any interruption give the same values. Returns every item's
    value on rank 0 ({} on the other ranks). JSON keys: items come back as strings and are turned to int."""
    remaining = [k for k in range(len(batches)) if f"{tag}:{k}" not in partial.done]
    if bar is not None:
        bar.update(sum(len(batches[k]) for k in range(len(batches)) if f"{tag}:{k}" in partial.done))
    global _BATCHES_DONE
    res = {}
    for k in remaining[rank()::world_size()]:
        out = fn(batches[k])
        partial.add(f"{tag}:{k}", [[i, v] for i, v in out.items()])
        res.update(out)
        _BATCHES_DONE += 1
        fault_point("batch", _BATCHES_DONE)
        if bar is not None:
            bar.update(len(batches[k]) * world_size())
    res = gather_dicts(res)
    if rank() == 0:
        for k in range(len(batches)):
            for i, v in partial.done.get(f"{tag}:{k}", []):
                res[int(i)] = v
    return res


def fault_point(kind: str, n: int) -> None:
    """Test hook: WLT_FAULT=KIND:N kills this process (SIGKILL, no cleanup) when it reaches point N of KIND
    ("step": before optimizer step N; "batch": after N labeling/sampling batches). Used by tests/test_faults.py
    to interrupt runs at exact places; unset, it does nothing."""
    if os.environ.get("WLT_FAULT") == f"{kind}:{n}" and rank() == int(os.environ.get("WLT_FAULT_RANK", "0")):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------
# 6d. `python wlt.py estimate`: the memory a training run needs per device, before launching it

# Published configs of the paper's models, so the estimate works without the hub (a local folder or config.json
# path, or any hub name reachable from here, works too).
KNOWN_CONFIGS = {
    "facebook/opt-125m": dict(model_type="opt", vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768),
    "facebook/opt-1.3b": dict(model_type="opt", vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                              num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     max_position_embeddings=4096, tie_word_embeddings=False),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=32768, tie_word_embeddings=False),
}


def model_config(name: str, trust_remote_code: bool = False):
    """A model's config from a folder, a config.json path, KNOWN_CONFIGS, or the hub."""
    from transformers import AutoConfig
    if name.endswith(".json") and os.path.isfile(name):
        with open(name) as f:
            d = json.load(f)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if not os.path.isdir(name) and name in KNOWN_CONFIGS:
        d = dict(KNOWN_CONFIGS[name])
        return AutoConfig.for_model(d.pop("model_type"), **d)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise WltError(f"no config for {name!r} (a folder, a config.json, or one of {', '.join(KNOWN_CONFIGS)}): "
                       f"{one_line(e)}") from None


def _fake_model(cfg, lora_rank: int, layers: int | None = None, dtype=torch.float32):
    """The model as FakeTensors (shapes only, no memory), with `layers` transformer blocks if given."""
    import copy as _copy
    from transformers import AutoModelForCausalLM
    cfg = _copy.deepcopy(cfg)
    if layers is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(cfg, key):
                setattr(cfg, key, layers)
        if getattr(cfg, "attention_types", None):  # GPT-Neo: one attention kind per layer
            cfg.attention_types = [[["global"], layers]]
            cfg.attention_layers = ["global"] * layers
        if getattr(cfg, "layer_types", None):  # Gemma-2/3, Qwen: one entry per layer
            cfg.layer_types = cfg.layer_types[:layers] + cfg.layer_types[-1:] * max(0, layers - len(cfg.layer_types))
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if lora_rank > 0:
        add_lora(model, lora_rank, 2.0 * lora_rank)
        for m in lora_modules(model):  # every parameter in the compute dtype, as under FSDP2's MixedPrecisionPolicy
            for lin in (m.lora_A, m.lora_B):
                lin.weight = nn.Parameter(lin.weight.detach().to(dtype))
    return model


def _saved_bytes(cfg, lora_rank: int, layers: int, batch: int, seq: int, dtype, train: bool) -> int:
    """Bytes autograd keeps for backward in one training forward of the model's body on [batch, seq] tokens,
    counted on FakeTensors (the code's real saved tensors, at no cost): every saved storage once, parameters
    left out."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _fake_model(cfg, lora_rank, layers, dtype).train(train)  # SFT keeps dropout, DPO does not
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s._cdata not in params:
                seen[s._cdata] = s.nbytes()
            return t
        ids = torch.zeros(batch, seq, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.base_model(input_ids=ids, use_cache=False)
    return sum(seen.values())


def estimate_memory(cfg, nproc: int = 1, lora_rank: int = 0, micro_batch: int = 1, max_len: int = 512,
                    kind: str = "dpo", dtype: str = "bf16", activation_checkpointing: bool = False) -> dict:
    """Expected peak memory per device (bytes) of train_sft.py / train_dpo.py, by part:

    weights      fp32 master weights, sharded over nproc (FSDP2)
    gathered     the compute copies FSDP2 all-gathers: the root unit (embeddings, head) for the whole step
                 plus two blocks (the current one and the prefetched one), in the compute dtype
    gradients    fp32 gradients of the trainable parameters, sharded
    optimizer    AdamW's two fp32 moments per trainable parameter, sharded
    activations  what autograd keeps for backward in one micro-batch of full-length sequences (SFT: micro;
                 DPO: 2 x micro, chosen and rejected unshared: an upper bound), traced on FakeTensors with 1
                 and 2 blocks and extrapolated linearly in the blocks; with activation checkpointing, one
                 block input per block plus one block's activations
    head         the log-prob kernel: hidden states at response positions and three [chunk, V] fp32 blocks
    """
    c = 2 if dtype == "bf16" else 4
    cdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    with torch.device("meta"):
        model = _fake_model(cfg, lora_rank)
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    blocks = transformer_blocks(model)
    n_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    n_root = n_all - sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    L = len(blocks)
    seqs = micro_batch * (2 if kind == "dpo" else 1)
    one = _saved_bytes(cfg, lora_rank, 1, seqs, max_len, cdt, kind == "sft")
    two = _saved_bytes(cfg, lora_rank, 2, seqs, max_len, cdt, kind == "sft")
    per_block, outside = two - one, 2 * one - two
    hidden = cfg.get_text_config().hidden_size if hasattr(cfg, "get_text_config") else cfg.hidden_size
    if activation_checkpointing:
        acts = outside + L * c * hidden * seqs * max_len + per_block
    else:
        acts = outside + L * per_block
    V = model.get_output_embeddings().weight.shape[0]
    head = c * hidden * seqs * max_len + 3 * 4 * min(LOGPS_CHUNK, V * seqs * max_len)
    parts = {
        "weights": 4 * n_all / nproc,
        "gathered": 0 if nproc == 1 else c * (n_root + 2 * n_block),
        "gradients": 4 * n_train / nproc,
        "optimizer": 8 * n_train / nproc,
        "activations": acts,
        "head": head,
    }
    parts["total"] = sum(parts.values())
    return {"bytes": parts, "parameters": n_all - n_lora, "lora": n_lora, "trainable": n_train, "blocks": L}


def estimate_cli(args) -> dict:
    cfg = model_config(args.model, args.trust_remote_code)
    kind = args.kind
    lora = args.lora_rank if args.lora_rank is not None else (8 if kind == "dpo" else 0)
    res = estimate_memory(cfg, args.nproc, lora, args.micro_batch_size, args.max_len, kind, args.dtype,
                          args.activation_checkpointing)
    gib = 2 ** 30
    what = (f"{args.model}: {res['parameters'] / 1e9:.2f}B parameters"
            + (f" + {res['lora'] / 1e6:.1f}M LoRA" if res["lora"] else "") + f" ({res['trainable'] / 1e6:.1f}M trainable), "
            f"{kind.upper()} {'LoRA rank ' + str(lora) if lora else 'full fine-tune'}, {args.nproc} device(s), "
            f"micro-batch {args.micro_batch_size} x {args.max_len} tokens, {args.dtype}"
            + (", activation checkpointing" if args.activation_checkpointing else ""))
    lines = [what, "", "| part | GiB per device |", "| --- | ---: |"]
    lines += [f"| {k} | {v / gib:.2f} |" for k, v in res["bytes"].items()]
    if args.device_memory:
        fits = res["bytes"]["total"] <= args.device_memory * gib
        lines.append("")
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {args.device_memory:g} GiB per device")
    print("\n".join(lines))
    return res


# ----------------------------------------------------------------------------------------------------------
# 7. the synthetic world: sort a short list of digits.
#
# Prompt "sort: 7 3 9 1 =>", ideal response " 1 3 7 9". Candidate responses are the sorted list with 0-4
# corruptions that keep the length (adjacent swap, digit replace). The gold reward is exact: the fraction of
# positions equal to the sorted list, minus 0.1 per missing or extra item. "Human" labels follow a
# Bradley-Terry model of the gold margin, P(prefer a) = sigmoid((gold_a - gold_b) / tau), so humans err
# mostly on close pairs, as the paper finds for real annotators.

SYN_DEFAULTS = {"num_pairs": 10000, "num_test": 1000, "tau": 0.3, "min_digits": 3, "max_digits": 6,
                "max_corruptions": 4}
SYN_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
SYN_TEACHER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
SYN_STUDENT = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512}


def syn_digits(prompt: str) -> list[str]:
    return prompt.replace("sort:", "").replace("=>", "").split()


def gold_reward(prompt: str, response: str) -> float:
    """Exact gold reward of the synthetic world: fraction of positions equal to the sorted prompt digits,
    minus 0.1 per missing or extra item (EOS and anything after it are not part of `response`)."""
    target = sorted(syn_digits(prompt))
    got = response.split()
    right = sum(1 for a, b in zip(got, target) if a == b)
    return right / len(target) - 0.1 * abs(len(got) - len(target))


def _corrupt(rng: random.Random, xs: list[str], k: int) -> list[str]:
    xs = list(xs)
    for _ in range(k):
        i = rng.randrange(len(xs))
        if rng.random() < 0.5 and len(xs) > 1:
            j = i + 1 if i + 1 < len(xs) else i - 1
            xs[i], xs[j] = xs[j], xs[i]
        else:
            xs[i] = rng.choice([d for d in "0123456789" if d != xs[i]])
    return xs


def make_synthetic_pairs(n: int, seed: int, tau: float = 0.3, min_digits: int = 3, max_digits: int = 6,
                         max_corruptions: int = 4, exclude: set | None = None) -> list[dict]:
    """n synthetic pairs with "human" (Bradley-Terry) labels. Each row also records gold_chosen/gold_rejected
    (exact) for the analysis; training uses prompt/chosen/rejected only. Prompts in `exclude` are redrawn."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        xs = [str(rng.randrange(10)) for _ in range(rng.randint(min_digits, max_digits))]
        prompt = "sort: " + " ".join(xs) + " =>"
        if exclude and prompt in exclude:
            continue
        target = sorted(xs)
        a = " " + " ".join(_corrupt(rng, target, rng.randint(0, max_corruptions)))
        b = " " + " ".join(_corrupt(rng, target, rng.randint(0, max_corruptions)))
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        if ga == gb:  # equal gold: no right answer to label; draw again
            continue
        p_a = 1 / (1 + math.exp(-(ga - gb) / tau))
        if rng.random() < p_a:
            rows.append({"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": ga, "gold_rejected": gb})
        else:
            rows.append({"prompt": prompt, "chosen": b, "rejected": a, "gold_chosen": gb, "gold_rejected": ga})
    return rows


def make_synthetic_tokenizer():
    """A word-level tokenizer over the world's words, with BOS prepended (its "own special tokens")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SYN_SPECIALS + ["sort:", "=>"] + list("0123456789"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_synthetic_model(tok, shape: dict, seed: int, out_dir: str) -> None:
    """A tiny randomly initialised Llama-architecture causal LM, saved in the standard HF layout."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                      **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------------------
# 8. prepare: materialise a run's data splits and its config.json

# Defaults per source: the paper's for real data (appendix A), the calibrated ones for the synthetic world.
# The paper's learning rates were lost; these are common practice (README, "Defaults").
SFT_LR = 2e-5
DPO_LR = {"lora": 5e-5, "full": 5e-7}  # LoRA updates need a much larger step than full fine-tuning
PAPER_DEFAULTS = {
    "teacher_model": "facebook/opt-125m", "student_model": "facebook/opt-1.3b", "beta": 0.1,
    "sft": {"lr": SFT_LR, "epochs": 1, "batch_size": 32},
    "dpo": {"lr_lora": DPO_LR["lora"], "lr_full": DPO_LR["full"], "epochs": 1, "batch_size": 16},
}
SYNTHETIC_DEFAULTS = {  # calibrated on 2 CPU cores (README, "The synthetic world")
    "beta": 0.5, "labeled_fraction": 0.2,
    "sft": {"lr": 3e-3, "epochs": 4, "batch_size": 32},
    "sft_student": {"lr": 3e-3, "epochs": 8, "batch_size": 32},
    "dpo": {"lr_lora": 1e-3, "lr_full": 1e-4, "epochs": 1, "batch_size": 16},
    # The student's DPO is full-parameter here: LoRA DPO of this tiny student on the weak labels learnt to stop
    # early (gold 0.82 after SFT -> 0.49; README, "The synthetic world"), full DPO at 1e-4 did not (0.91).
    "dpo_student": {"lora_rank": 0},
}


def read_run_config(run_dir: str) -> dict:
    """runs/NAME/config.json, as `wlt.py prepare` wrote it (a clear error when it is missing or broken)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise WltError(f"{path}: no such file; run `python wlt.py prepare --out {run_dir} ...` first")
    try:
        cfg = json.load(open(path))
    except json.JSONDecodeError as e:
        raise WltError(f"{path}: not a run config made by `wlt.py prepare` ({one_line(e)})") from None
    if not isinstance(cfg, dict):
        raise WltError(f"{path}: not a run config made by `wlt.py prepare`")
    return cfg


def run_defaults(run_dir: str, script: str, role: str) -> dict:
    """Defaults for a trainer in --run mode, from runs/NAME/config.json (explicit flags override them)."""
    cfg = read_run_config(run_dir)
    try:
        return dict(cfg["train"][script].get(role, {}))
    except (KeyError, TypeError, AttributeError) as e:
        raise WltError(f"{os.path.join(run_dir, 'config.json')}: not a run config made by `wlt.py prepare` "
                       f"({one_line(e)})") from None


def _permute_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A tokenizer-free seeded permutation: the first `fraction` of it goes to the first part."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    k = round(fraction * len(rows))
    return [rows[i] for i in sorted(idx[:k])], [rows[i] for i in sorted(idx[k:])]


def length_filter(tok, items: list[tuple[dict, str]], max_len: int, skips: Skips, part: str) -> list[tuple[dict, str]]:
    """items: [(pair, "file:line")]. Keep pairs with len(prompt_ids) + len(longer response ids) <= max_len;
    count the rest (the paper's filter: a documented count, so --strict does not apply to it). A response
    with no tokens at all is a skip (an error under skips.strict)."""
    toks, _ = tokenize_pairs(tok, [p for p, _ in items], desc=f"length filter ({part})")
    kept, too_long = [], f"longer than --max-len {max_len}"
    for (p, loc), t in zip(items, toks):
        if not t["chosen_ids"] or not t["rejected_ids"]:
            skips.add("a response has no tokens", loc)
            continue
        if len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"])) > max_len:
            skips.add(too_long, loc, policy=True)
            continue
        kept.append((p, loc))
    return kept


def prepare(args) -> dict | None:
    """Write runs/NAME/data/{labeled,unlabeled,test}.jsonl and config.json. Returns the config, or None when
    config.json already records the same settings and an unchanged source (nothing to do)."""
    out = args.out
    settings = {k: v for k, v in vars(args).items() if k not in ("cmd", "overwrite")}
    inputs = {"data": fingerprint(args.data)}
    marker = os.path.join(out, "config.json")
    if not args.overwrite and same_settings(marker, settings, inputs):
        log(f"{marker}: prepared already with the same settings; nothing to do (--overwrite prepares again)")
        return None
    if os.path.isfile(marker):
        log(f"{marker}: settings or source changed; preparing again (later stages will rerun)")
        os.remove(marker)
    data_dir = os.path.join(out, "data")
    skips = Skips(strict=args.strict)
    syn = args.data == "synthetic"
    defaults = SYNTHETIC_DEFAULTS if syn else PAPER_DEFAULTS
    labeled_fraction = args.labeled_fraction if args.labeled_fraction is not None else defaults.get("labeled_fraction", 0.5)
    beta = args.beta if args.beta is not None else defaults["beta"]
    world = None
    if syn:
        world = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in SYN_DEFAULTS.items()}
        models_dir = os.path.join(out, "models")
        world_tok = make_synthetic_tokenizer()
        teacher = args.teacher_model or os.path.join(models_dir, "teacher-base")
        student = args.student_model or os.path.join(models_dir, "student-base")
        if not args.teacher_model:
            make_synthetic_model(world_tok, SYN_TEACHER, args.seed, teacher)
        if not args.student_model:
            make_synthetic_model(world_tok, SYN_STUDENT, args.seed + 1, student)
        wargs = {k: world[k] for k in ("tau", "min_digits", "max_digits", "max_corruptions")}
        train_rows = make_synthetic_pairs(world["num_pairs"], args.seed, **wargs)
        # test prompts never seen in training, so evaluation measures generalisation, not recall
        test_rows = make_synthetic_pairs(world["num_test"], args.seed + 10_000, exclude={r["prompt"] for r in train_rows},
                                         **wargs)
        source = {"train": train_rows, "test": test_rows}
        locs = {k: [f"synthetic/{k}:{i}" for i in range(1, len(v) + 1)] for k, v in source.items()}
    else:
        teacher = args.teacher_model or PAPER_DEFAULTS["teacher_model"]
        student = args.student_model or PAPER_DEFAULTS["student_model"]
        locs = {}
        source = load_source(args.data, skips, locs)
    tok_path = args.tokenizer or teacher
    tok = load_tokenizer(tok_path)  # for the length filter only
    pool = list(zip(source["train"], locs["train"]))  # (pair, "file:line")
    test = list(zip(source["test"], locs["test"]))
    if not pool:
        raise WltError(f"{args.data}: no usable pairs in the training split")
    if not test:  # no test split in the source: carve one first, from the same seeded permutation
        test, pool = _permute_split(pool, args.test_fraction, args.seed)
    labeled, unlabeled = _permute_split(pool, labeled_fraction, args.seed)
    counts = {}
    parts = {"labeled": labeled, "unlabeled": unlabeled, "test": test}
    for name in parts:
        before = len(parts[name])
        part_skips = Skips(strict=args.strict)
        parts[name] = length_filter(tok, parts[name], args.max_len, part_skips, name)
        counts[name] = {"before_length_filter": before, "kept": len(parts[name]), "skipped": dict(part_skips.counts),
                        "skipped_examples": {k: list(v) for k, v in part_skips.where.items()}}
        log(f"{name}: {len(parts[name])} pairs kept of {before}"
            + "".join(f"; {n} {r}" for r, n in part_skips.counts.items()))
    skips.report(args.data)
    sft_t = dict(defaults["sft"])
    sft_s = dict(defaults.get("sft_student", defaults["sft"]))
    dpo = dict(defaults["dpo"], beta=beta)
    config = {
        "source": args.data, "labeled_fraction": labeled_fraction, "seed": args.seed, "max_len": args.max_len,
        "tokenizer": tok_path, "teacher_model": teacher, "student_model": student, "beta": beta,
        "synthetic": world, "counts": counts, "source_skips": skips.as_dict(), "args": settings, "inputs": inputs,
        "train": {
            "train_sft.py": {"teacher": dict(sft_t, model=teacher), "student": dict(sft_s, model=student)},
            "train_dpo.py": {"teacher": dpo, "student": dict(dpo, **defaults.get("dpo_student", {}))},
        },
    }
    for name, items in parts.items():
        write_jsonl(os.path.join(data_dir, f"{name}.jsonl"), [p for p, _ in items])
    write_json(os.path.join(out, "config.json"), config)  # last: its presence marks a complete prepare
    log(f"wrote {data_dir}/{{labeled,unlabeled,test}}.jsonl and {out}/config.json")
    return config


def main() -> None:
    ap = argparse.ArgumentParser(prog="wlt.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="materialise a run's data splits (data/*.jsonl) and config.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="hh-rlhf | tldr | synthetic | a local .jsonl(.gz)/.parquet file or folder")
    p.add_argument("--out", required=True, help="the run directory, e.g. runs/NAME")
    p.add_argument("--labeled-fraction", type=float, default=None,
                   help="share of the training pairs that keeps human labels (D_l); default 0.5 (paper), 0.2 synthetic")
    p.add_argument("--test-fraction", type=float, default=0.1, help="test share for sources without a test split")
    p.add_argument("--seed", type=int, default=22, help="seed of the labeled/unlabeled split (paper: 22)")
    p.add_argument("--max-len", type=int, default=512, help="pairs whose prompt + longer response exceed this many tokens are dropped (counted)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for the length filter (default: the teacher model's)")
    p.add_argument("--teacher-model", default=None, help="teacher base model, recorded in config.json (default: facebook/opt-125m; synthetic: a tiny Llama)")
    p.add_argument("--student-model", default=None, help="student base model, recorded in config.json (default: facebook/opt-1.3b; synthetic: a tiny Llama)")
    p.add_argument("--beta", type=float, default=None, help="DPO beta recorded for the run (default 0.1; synthetic 0.5)")
    p.add_argument("--strict", action="store_true", help="make every skipped source row an error")
    p.add_argument("--overwrite", action="store_true",
                   help="prepare again even if config.json records the same settings (default: nothing to do then)")
    p.add_argument("--num-pairs", dest="num_pairs", type=int, default=None, help=f"synthetic: training pairs ({SYN_DEFAULTS['num_pairs']})")
    p.add_argument("--num-test", dest="num_test", type=int, default=None, help=f"synthetic: test pairs ({SYN_DEFAULTS['num_test']})")
    p.add_argument("--tau", type=float, default=None, help=f"synthetic: Bradley-Terry temperature of the human labels ({SYN_DEFAULTS['tau']})")
    e = sub.add_parser("estimate", help="expected memory per device of a training run (weights, gradients, "
                                        "optimizer, activations), before launching it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", required=True, help="model folder, config.json, hub name, or one of: " + ", ".join(KNOWN_CONFIGS))
    e.add_argument("--nproc", type=int, default=1, help="devices the model is sharded over (FSDP2)")
    e.add_argument("--kind", choices=["sft", "dpo"], default="dpo", help="SFT (sequences) or DPO (pairs: 2 sequences each)")
    e.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: 8 for DPO, 0 = full fine-tune for SFT)")
    e.add_argument("--micro-batch-size", type=int, default=1, help="sequences (SFT) or pairs (DPO) per device per forward")
    e.add_argument("--max-len", type=int, default=512, help="tokens per sequence (the estimate assumes every sequence is this long)")
    e.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype (bf16 on CUDA, fp32 on CPU)")
    e.add_argument("--activation-checkpointing", action="store_true", help="as the trainers' flag")
    e.add_argument("--device-memory", type=float, default=None, help="GiB per device: say whether the run fits")
    e.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args)
    elif args.cmd == "estimate":
        estimate_cli(args)


if __name__ == "__main__":
    run_main(main)
