"""Evaluation as in the paper (section 4.1 and 4.3): sample from each policy on the test prompts, score the
samples with a gold reward, compare the policies, and analyse the weak labels against the human ones.

    python evaluate.py                                      the default run (runs/synthetic): exact gold reward
    python evaluate.py --run-dir runs/hh --gold-rm Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback
    python evaluate.py --policy a=out/a --policy b=out/b --prompts test.jsonl --gold-rm RM --out eval/
    torchrun --nproc_per_node 2 evaluate.py --run-dir runs/demo  (each process takes a share of the prompts)

Policies of a run: base (the student's base model), sft (student/sft, the DPO reference), human
(student/dpo-human, DPO on D_u's human labels) and weak (student/dpo-weak, DPO on the teacher's labels);
missing ones are left out with a message. --policy NAME=PATH (repeatable) chooses them explicitly.

Sampling: temperature 0.7 and at most 256 new tokens (flags), left-padded batches with a KV cache; every
prompt has its own random generator seeded with --seed + its index, so a sample does not depend on the
batch it falls in, and all policies see the same random numbers (paired comparisons).

Gold reward: in the synthetic world the exact function of (prompt, response) (lib/synthetic.py, gold_reward). Otherwise
any HF sequence-classification reward model with one output (--gold-rm), fed in one of two formats:
  chat  the prompt's turns ("Human:" -> user, "Assistant:" -> assistant) plus the response as the last
        assistant turn, through the reward model's chat template (e.g. the Mistral-7B reward model);
  pair  (question, answer) = (prompt text, response) as a text pair (e.g. OpenAssistant's DeBERTa model).
--rm-format auto takes chat when the reward model's tokenizer has a chat template, else pair.

Outputs in --out (default runs/NAME/eval): results.md (the paper's table layout), results.json (every
number), generations.jsonl (policy, index, prompt, response, gold). results.json is written last and marks
a complete evaluation: rerunning the same command on unchanged inputs prints the table again and stops.
"""
import argparse
import dataclasses
import functools
import inspect
import math
import os
import random
import re
import statistics
import time

import torch

import wlt
from lib import dist, outputs, runs, synthetic
from lib.console import WltError, argument_parser, check_ranges, log, one_line
from lib.data import (Skips, encode_conversation, encode_prompts, holds_special, in_batches, pad_id, pair_text,
                      read_pairs, read_prompts, require_chat_template, special_pattern)
from lib.dist import rank
from lib.files import dump_jsonl, dump_text, fingerprint, remove_dir, same_settings
from lib.memory import HostMemory
from lib.models import check_model_dir, load_model, load_tokenizer
from lib.outputs import Partial, run_batches
from lib.signals import run_main

ROLE_NAMES = {"base": "base model", "sft": "SFT (reference)", "human": "pi_human (DPO, human labels)",
              "weak": "pi_weak (DPO, weak labels)"}


def build_parser() -> argparse.ArgumentParser:
    ap = argument_parser(__doc__)
    g = ap.add_argument_group("what to evaluate: the policies of a run, or explicit ones")
    g.add_argument("--run-dir", default=None,
                   help=f"run folder: its student policies, test prompts, labels and gold reward (default "
                        f"{runs.shown(runs.DEFAULT_RUN)} unless --policy is given)")
    g.add_argument("--policy", action="append", default=[], metavar="NAME=PATH",
                   help="a policy to evaluate (repeatable); replaces the run's set")
    g.add_argument("--prompts", default=None,
                   help="prompt file (.jsonl/.json/.parquet: a \"prompt\" string or conversation per row, or pairs of "
                        "any layout of docs/data.md; default: the run's data/test.jsonl)")
    g.add_argument("--out", default=None, help="output folder (default: RUN/eval)")
    g.add_argument("--num-prompts", type=int, default=0, help="evaluate the first N prompts (0: all)")
    s = ap.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (paper: 0.7); 0 = greedy")
    s.add_argument("--max-new-tokens", type=int, default=256, help="at most this many new tokens per sample (paper: 256)")
    s.add_argument("--max-len", type=int, default=None,
                   help="prompt tokens at most (default: the run's --max-len, the longest the policies trained on, "
                        "else 512); longer prompts lose tokens from the left (counted in the table), and so do "
                        "prompts that leave no room for --max-new-tokens within the model's positions")
    s.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    s.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i, for every policy")
    s.add_argument("--chat-template", action="store_true",
                   help="feed prompts to the policies through their tokenizer's chat template (for chat models)")
    r = ap.add_argument_group("gold reward")
    r.add_argument("--gold-rm", default=None,
                   help="HF sequence-classification reward model (name or folder); default: exact in the synthetic world")
    r.add_argument("--rm-format", choices=["auto", "chat", "pair"], default="auto", help="how the reward model reads a sample: chat = the dialogue through its chat template, pair = (prompt, response) as a text pair; auto = chat when its tokenizer has a chat template, else pair")
    r.add_argument("--rm-batch-size", type=int, default=8, help="sequences per reward-model forward")
    r.add_argument("--rm-max-len", type=int, default=1024, help="reward-model input tokens (truncated from the left beyond)")
    r.add_argument("--analysis-pairs", type=int, default=2000,
                   help="label-quality analysis with a reward model: score this many D_u pairs (seeded sample; 0: all). "
                        "The synthetic world's gold reward is exact and always covers every pair")
    o = ap.add_argument_group("other")
    o.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto = bf16 on CUDA, fp32 on CPU")
    o.add_argument("--overwrite", action="store_true",
                   help="evaluate again even if complete results with the same settings exist, or write into a "
                        "folder that is not evaluate.py's output")
    o.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model folder/hub (only from the command line)")
    o.add_argument("--dist-timeout", type=float, default=dist.DIST_TIMEOUT_MIN,
                   help="minutes a process waits for the others in a collective under torchrun")
    return ap


def parse_args() -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args()
    if args.policy and not args.run_dir and not (args.prompts and args.out):
        ap.error("--policy without --run-dir needs --prompts and --out")
    if args.run_dir or not args.policy:
        args.run_dir = os.path.abspath(args.run_dir or runs.DEFAULT_RUN)
        args.out = args.out or os.path.join(args.run_dir, "eval")
        args.prompts = args.prompts or os.path.join(args.run_dir, "data", "test.jsonl")
    for p in args.policy:
        if "=" not in p or not p.split("=", 1)[0] or not p.split("=", 1)[1]:
            ap.error(f"--policy {p!r}: expected NAME=PATH")
    check_ranges(ap, args, num_prompts=">= 0", temperature=">= 0", max_new_tokens=">= 1", max_len=">= 1",
                 batch_size=">= 1", rm_batch_size=">= 1", rm_max_len=">= 1", analysis_pairs=">= 0",
                 dist_timeout="> 0")
    return args


OUTPUT_FILES = {"results.json", "results.md", "generations.jsonl", "results.partial"}


def is_evaluate_output(folder: str) -> bool:
    """Every entry of the folder is one evaluate.py writes (a temporary one left by a kill included)."""
    return all(n in OUTPUT_FILES or n.split(".tmp.")[0] in OUTPUT_FILES for n in os.listdir(folder))


def policies(args, cfg: dict) -> dict[str, str]:
    """name -> model path, in table order."""
    if args.policy:
        return dict(p.split("=", 1) for p in args.policy)
    s = os.path.join(args.run_dir, "student")
    out = {}
    base = cfg.get("student_model")
    if base:  # a hub name, or a local model folder
        out["base"] = base
    for name, sub in (("sft", "sft"), ("human", "dpo-human"), ("weak", "dpo-weak")):
        path = os.path.join(s, sub)
        if os.path.isfile(os.path.join(path, "train_config.json")):  # the trainer's completion marker
            out[name] = path
        else:
            log(f"policy {name}: no finished training in {path}, left out")
    if not out:
        runs.require(args.run_dir, "student/sft")
    return out


# ---------------------------------------------------------------------------------------------------------
# sampling


def hh_messages(prompt: str) -> list[dict]:
    """An HH-RLHF prompt ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:") as chat
    messages; a prompt without those markers is one user message."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    if len(parts) < 3:
        return [{"role": "user", "content": prompt.strip()}]
    turns = [("user", parts[0].strip())] if parts[0].strip() else []  # text before the first marker
    turns += [("user" if who == "Human" else "assistant", text.strip()) for who, text in zip(parts[1::2], parts[2::2])]
    turns = [t for t in turns if t != ("assistant", "")]  # the final "Assistant:" cue of the prompt
    msgs = []
    for role, text in turns:  # chat templates require alternating roles: merge repeated ones
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] = (msgs[-1]["content"] + "\n\n" + text).strip()
        else:
            msgs.append({"role": role, "content": text})
    return msgs or [{"role": "user", "content": ""}]


def sample_next(logits: torch.Tensor, temperature: float, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits / T), each row with its own generator. logits: [B, V] -> [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])


@functools.lru_cache(maxsize=None)
def _kv_cache_kwarg(forward_owner: type) -> str:
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def kv_cache_kwarg(model) -> str:
    """The keyword under which a model's forward takes a KV cache: `cache` in transformers 5.x (where
    `past_key_values` is deprecated), `past_key_values` before."""
    return _kv_cache_kwarg(type(model))


def kv_cache_of(output):
    """The KV cache a forward with use_cache=True returned (`cache` in transformers 5.x, `past_key_values` before)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


@torch.no_grad()
def generate(model, prompts: list[list[int]], seeds: list[int], eos, pad: int, temperature: float,
             max_new_tokens: int, dev, dtype: str) -> list[list[int]]:
    """Sample continuations of left-padded prompts with a KV cache. Positions are passed explicitly (the
    count of real tokens before each one), so left padding does not shift them in any family. eos: an id or
    a list of ids that end a sample. Returns the new token ids per prompt, up to and including EOS.
    In fp32 a sample does not depend on the batch it falls in (checked by the tests); under bf16 the padding
    of a batch can change the last bits of the logits, and so, rarely, a sample."""
    eos_ids = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=dev)
    B = len(prompts)
    ids, mask = (t.to(dev) for t in wlt.pad_batch(prompts, pad, left=True))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    next_pos = mask.sum(-1, keepdim=True)
    with dist.autocast(dev, dtype):
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        # a left-padded row's padding queries see no key; an attention kernel that turns that row into NaN and
        # lets it reach a real position would make every sample of the batch garbage: say so, do not sample it
        if not torch.isfinite(res.logits[:, -1]).all():
            bad = (~torch.isfinite(res.logits[:, -1]).all(-1)).nonzero().flatten().tolist()
            raise WltError(f"{getattr(model, 'name_or_path', 'the model')}: non-finite next-token logits after the "
                           f"left-padded prompts of rows {bad[:5]} (an attention kernel's padding; try --dtype fp32 "
                           f"or --batch-size 1)")
        for _ in range(max_new_tokens):
            nxt = sample_next(res.logits[:, -1], temperature, gens)
            for i in (~done).nonzero().flatten().tolist():
                out[i].append(int(nxt[i]))
            done |= torch.isin(nxt, eos_ids)
            if done.all():
                break
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                        use_cache=True, **{kv_cache_kwarg(model): kv_cache_of(res)})
            next_pos = next_pos + 1
    return out


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How every policy samples, resolved once from the flags: prompt i draws with seed + i."""
    seed: int
    temperature: float
    max_new_tokens: int
    dtype: str  # --dtype: bf16 autocast on CUDA by default


def sample_batch(b: list[int], model, tok, enc: list[list[int]], eos: list[int], pad: int, sampling: Sampling,
                 dev) -> dict:
    """{prompt index: response text} of one batch of prompts."""
    new = generate(model, [enc[i] for i in b], [sampling.seed + i for i in b], eos, pad, sampling.temperature,
                   sampling.max_new_tokens, dev, sampling.dtype)
    return {i: tok.decode([t for t in ids if t not in eos], skip_special_tokens=True) for i, ids in zip(b, new)}


def sample_policy(args, name: str, path: str, prompts: list[str], dev, stats: dict, partial) -> dict[int, str]:
    """{prompt index: response text} for one policy (this rank's share; rank 0 gets all after gathering)."""
    check_model_dir(path)
    tok = load_tokenizer(path, args.trust_remote_code)
    model = load_model(path, args.trust_remote_code, dist.compute_dtype(dev, args.dtype), dev).eval()
    eos, pad = tok.eos_token_id, pad_id(tok)
    if eos is None:
        raise WltError(f"{path}: the tokenizer has no EOS token; set one")
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # e.g. also <|eot_id|>
    eos = sorted({eos} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []))
    positions = getattr(model.config, "max_position_embeddings", None)
    room = min(args.max_len, positions - args.max_new_tokens) if positions else args.max_len
    if room < 1:
        raise WltError(f"{path}: the model's {positions} positions leave no room for a prompt next to "
                           f"--max-new-tokens {args.max_new_tokens}")
    if any(not isinstance(p, str) for p in prompts):  # conversations: the chat template, as in training
        require_chat_template(tok, f"{args.prompts} under {path}")
    if args.chat_template:
        require_chat_template(tok, f"{path} (--chat-template)")
        prompts = [hh_messages(p) if isinstance(p, str) else p for p in prompts]
    enc = encode_prompts(tok, prompts)  # the training convention (lib.data): BOS once, templates rendered
    stats[name] = {"prompts_cut": sum(len(e) > room for e in enc)}
    enc = [e[-room:] for e in enc]
    empty = [i for i, e in enumerate(enc) if not e]
    if empty:  # nothing to condition on (an empty prompt and a tokenizer without BOS)
        raise WltError(f"{args.prompts}: prompt {empty[0] + 1} has no tokens under {path}'s tokenizer "
                           f"({len(empty)} such prompts); remove them or use a tokenizer that adds BOS")

    t0 = time.time()
    sampling = Sampling(args.seed, args.temperature, args.max_new_tokens, args.dtype)
    out = run_batches(in_batches([len(e) for e in enc], args.batch_size), partial, sample_batch, model, tok, enc, eos,
                      pad, sampling, dev, tag=f"gen:{name}", desc=f"sample {name}", unit="prompt")
    stats[name]["seconds"] = time.time() - t0
    del model
    return out


# ---------------------------------------------------------------------------------------------------------
# gold reward


class GoldRM:
    """A sequence-classification reward model with a single score, fed chat messages or a text pair."""

    def __init__(self, path: str, fmt: str, batch_size: int, max_len: int, dev, dtype: str, trust: bool):
        from transformers import AutoModelForSequenceClassification
        check_model_dir(path)
        self.tok = load_tokenizer(path, trust)
        use_bf16 = dtype == "bf16" or (dtype == "auto" and dev.type == "cuda")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.bfloat16 if use_bf16 else torch.float32, trust_remote_code=trust).to(dev).eval()
        except (OSError, ValueError) as e:
            raise WltError(f"cannot load reward model {path!r}: {one_line(e)}") from None
        if self.model.config.num_labels != 1:
            raise WltError(f"{path}: a reward model has one output, this one has {self.model.config.num_labels}")
        if use_bf16:  # the score itself in fp32: bf16 keeps 3 digits, and rounded scores tie where they differ
            for name in ("score", "classifier"):  # decoder RMs' head, encoder RMs' (after their pooler)
                head = getattr(self.model, name, None)
                if isinstance(head, torch.nn.Module):
                    head.float().register_forward_pre_hook(lambda m, args: tuple(a.float() for a in args))
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if self.model.config.pad_token_id is None:  # decoder RMs score the last non-pad token
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.tok.padding_side = "right"
        self.tok.truncation_side = "left"
        self.fmt = fmt if fmt != "auto" else ("chat" if self.tok.chat_template else "pair")
        self.specials = special_pattern(self.tok)
        self.path, self.batch_size, self.max_len, self.dev = path, batch_size, max_len, dev

    def encode(self, prompt, response) -> dict:
        """The reward model's input for one sample: every field its tokenizer makes (input_ids, and
        token_type_ids for models with segment embeddings). prompt and response: strings, or conversations
        (conversational data: a sample is a string, a pair's response its messages)."""
        if self.fmt == "chat":
            msgs = hh_messages(prompt) if isinstance(prompt, str) else list(prompt)
            msgs += [{"role": "assistant", "content": response.strip()}] if isinstance(response, str) else response
            if holds_special(self.specials, [m["content"] for m in msgs]):  # text stays text (lib.data)
                return {"input_ids": encode_conversation(self.tok, msgs, False, self.specials)[-self.max_len:]}
            text = self.tok.apply_chat_template(msgs, tokenize=False)
            enc = self.tok(text, add_special_tokens=False, truncation=True, max_length=self.max_len)
        else:
            texts = (pair_text(prompt).strip(), pair_text(response).strip())
            kw = {"split_special_tokens": True} if holds_special(self.specials, texts) else {}
            enc = self.tok(*texts, truncation="only_first", max_length=self.max_len, **kw)
        return {k: v for k, v in enc.items() if k != "attention_mask"}

    def forward(self, batch: dict) -> torch.Tensor:
        """[B] scores of a right-padded batch. Decoder reward models (a `score` head on every position) are
        read at each sequence's last real token, found from the attention mask: transformers' own pooling
        looks for the last token that is not the pad id, which is wrong when pad == EOS and a text ends in
        EOS. Encoder models pool the first token and take the batch as it is."""
        if hasattr(self.model, "score"):
            h = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            last = batch["attention_mask"].sum(-1) - 1
            return self.model.score(h[torch.arange(len(h), device=h.device), last])[:, 0]
        return self.model(**batch).logits[:, 0]

    def score_batch(self, b: list[int], enc: list[dict]) -> dict:
        """{item: gold reward} of one batch of encoded items."""
        batch = self.tok.pad([enc[i] for i in b], return_tensors="pt")
        scores = self.forward({k: v.to(self.dev) for k, v in batch.items()})
        return dict(zip(b, scores.float().cpu().tolist()))

    @torch.no_grad()
    def score(self, items: list[tuple[str, str]], desc: str, partial) -> list[float]:
        """Gold rewards of (prompt, response) items, split over the ranks; every rank gets the full list."""
        enc = []
        for i, (p, r) in enumerate(items):
            try:
                enc.append(self.encode(p, r))
            except Exception as e:  # e.g. a chat template that rejects the conversation
                raise WltError(f"{self.path}: cannot build the reward-model input of item {i} ({desc}): "
                                   f"{one_line(e)}") from None

        res = run_batches(in_batches([len(e["input_ids"]) for e in enc], self.batch_size), partial, self.score_batch,
                          enc, tag=f"rm:{desc}", desc=desc, unit="seq")
        res = dist.broadcast(res)
        return [res[i] for i in range(len(items))]


# ---------------------------------------------------------------------------------------------------------
# statistics (pure functions)


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error, sample std / sqrt(n)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def paired_delta(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a_i - b_i over the same prompts and its standard error (the paired comparison)."""
    return mean_se([x - y for x, y in zip(a, b)])


def z_score(delta: float, se: float) -> float:
    """delta in units of its standard error (+-inf when se is 0 and delta is not; nan when undefined)."""
    if math.isnan(se) or (se == 0 and delta == 0):
        return float("nan")
    return delta / se if se > 0 else math.copysign(float("inf"), delta)


def win_rate(a: list[float], b: list[float]) -> dict:
    """Share of prompts where a's sample has the higher gold reward than b's; ties counted apart."""
    n = len(a)
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    return {"win": wins / n, "tie": ties / n, "loss": (n - wins - ties) / n, "n": n,
            "win_excluding_ties": wins / (n - ties) if n > ties else float("nan")}


def label_quality(rows: list[dict], gold: list[tuple[float, float]]) -> dict:
    """Paper section 4 / Table 2 on labeled pairs. rows: label.py output (teacher order, human_agrees);
    gold: (gold reward of the row's chosen, of its rejected). Subsets: match (teacher agrees with the human
    label) and mismatch. Reported per subset by the *human* label: mean gold reward of the human-chosen and
    human-rejected responses and their gap; on the mismatches, the share where the teacher's choice has the
    higher gold reward (paper: 44.3%); the gold accuracy of both label sources (gold ties counted apart)."""
    out = {"pairs": len(rows)}
    hum = [(gc, gr) if r["human_agrees"] else (gr, gc) for r, (gc, gr) in zip(rows, gold)]  # (human-chosen, -rejected)
    for name, keep in (("match", True), ("mismatch", False)):
        sub = [h for r, h in zip(rows, hum) if r["human_agrees"] == keep]
        if not sub:
            out[name] = {"pairs": 0}
            continue
        c, rj = [x for x, _ in sub], [y for _, y in sub]
        out[name] = {"pairs": len(sub), "share": len(sub) / len(rows), "gold_chosen": statistics.fmean(c),
                     "gold_rejected": statistics.fmean(rj), "gap": statistics.fmean(c) - statistics.fmean(rj)}
    mm = [(gc, gr) for r, (gc, gr) in zip(rows, gold) if not r["human_agrees"]]
    if mm:
        out["mismatch"]["teacher_right"] = sum(gc > gr for gc, gr in mm) / len(mm)
        out["mismatch"]["gold_ties"] = sum(gc == gr for gc, gr in mm) / len(mm)
    out["gold_accuracy"] = {"human": sum(c > r for c, r in hum) / len(hum),
                            "weak": sum(gc > gr for gc, gr in gold) / len(gold),
                            "gold_ties": sum(gc == gr for gc, gr in gold) / len(gold)}
    return out


# ---------------------------------------------------------------------------------------------------------
# the table


def fmt(x: float, nd: int = 3, sign: bool = False) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def results_markdown(res: dict) -> str:
    s = res["setup"]
    lines = [f"# Results: {s['what']}", "",
             f"Gold reward: {s['gold']}. {s['prompts']} test prompts, temperature {s['temperature']}, "
             f"at most {s['max_new_tokens']} new tokens, seed {s['seed']}.", "",
             "| policy | gold reward (mean ± SE) | vs base | vs SFT (paired) |", "| --- | --- | --- | --- |"]
    for name, p in res["policies"].items():
        vs_sft = p.get("vs_sft")
        sft_cell = "" if not vs_sft else f"{fmt(vs_sft['delta'], sign=True)} ± {fmt(vs_sft['se'])} ({fmt(vs_sft['z'], 1, sign=True)} SE)"
        lines.append(f"| {ROLE_NAMES.get(name, name)} | {fmt(p['mean'])} ± {fmt(p['se'])} | "
                     f"{fmt(p['vs_base'], sign=True) if p.get('vs_base') is not None else ''} | {sft_cell} |")
    cut = {n: p["prompts_cut"] for n, p in res["policies"].items() if p.get("prompts_cut")}
    if cut:
        lines += ["", "Prompts cut from the left to fit the positions: "
                      + ", ".join(f"{n} {k} of {s['prompts']}" for n, k in cut.items()) + "."]
    if "win_rate" in res:
        w = res["win_rate"]
        lines += ["", f"Win rate of pi_weak against pi_human by gold reward, over {w['n']} prompts: "
                      f"{100 * w['win']:.1f}% win, {100 * w['tie']:.1f}% tie, {100 * w['loss']:.1f}% loss "
                      f"({100 * w['win_excluding_ties']:.1f}% of the decided prompts)."]
    lq = res.get("label_quality")
    if lq:
        lines += ["", f"## Label quality on D_u ({lq['pairs']} pairs{', ' + lq['sample'] if lq.get('sample') else ''})", "",
                  f"Weak labels agree with the human labels on {100 * lq['agreement']:.1f}% of D_u "
                  f"({lq['agreement_pairs']} pairs; paper, HH-RLHF: 60.6%).", "",
                  "| subset | pairs | gold reward of human-chosen | of human-rejected | gap |", "| --- | --- | --- | --- | --- |"]
        for name in ("match", "mismatch"):
            m = lq[name]
            if m["pairs"]:
                lines.append(f"| {name} | {m['pairs']} ({100 * m['share']:.1f}%) | {fmt(m['gold_chosen'])} | "
                             f"{fmt(m['gold_rejected'])} | {fmt(m['gap'], sign=True)} |")
        if "teacher_right" in lq["mismatch"]:
            lines += ["", f"On the mismatches the teacher's choice has the higher gold reward in "
                          f"{100 * lq['mismatch']['teacher_right']:.1f}% of pairs (paper: 44.3%)."]
        ga = lq["gold_accuracy"]
        lines += ["", f"Gold accuracy (the chosen response has the higher gold reward): human labels "
                      f"{100 * ga['human']:.1f}%, weak labels {100 * ga['weak']:.1f}%"
                      + (f" ({100 * ga['gold_ties']:.1f}% of pairs tie in gold reward)." if ga["gold_ties"] else ".")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    dist.init_distributed(args.dist_timeout)  # every process, before rank 0 takes the lock for them
    with outputs.locked(args.out):  # this run alone writes --out, to its end: a second run on it is refused
        run(args)


def run(args):
    """The evaluation: every check, sampling each policy, the gold rewards, the tables."""
    if args.run_dir:
        runs.prepare_if_default(args.run_dir, args.dist_timeout)
    cfg = runs.read_run_config(args.run_dir) if args.run_dir else {}
    if args.max_len is None:  # the run's length limit: the longest prompt its policies trained on
        args.max_len = cfg.get("max_len", 512)
    exact_gold = cfg.get("source") == "synthetic" and not args.gold_rm
    if not exact_gold and not args.gold_rm:
        raise WltError("--gold-rm is required outside the synthetic world (an HF sequence-classification reward model)")
    if not args.policy:  # the run's policies: a final save that a kill cut is completed before they are chosen
        outputs.check_model_inputs({f"policy {role}": os.path.join(args.run_dir, "student", sub) for role, sub in
                                    (("sft", "sft"), ("human", "dpo-human"), ("weak", "dpo-weak"))},
                                   finished_only=False)
    pols = policies(args, cfg)
    outputs.check_model_inputs({f"--policy {n}": p for n, p in pols.items()})  # finished, and not being written
    weak_path = os.path.join(args.run_dir, "data", "weak.jsonl") if args.run_dir else None
    outputs.check_apart({"--out": args.out}, {**{f"--policy {n}": p for n, p in pols.items()},
                                             "--prompts": args.prompts, "--gold-rm": args.gold_rm,
                                             "the run's weak labels": weak_path})
    inputs = {"policies": {n: fingerprint(p) for n, p in pols.items()}, "prompts": fingerprint(args.prompts),
              "weak": fingerprint(weak_path), "gold_rm": fingerprint(args.gold_rm)}
    marker = os.path.join(args.out, "results.json")
    complete = all(os.path.isfile(os.path.join(args.out, f)) for f in ("results.md", "generations.jsonl"))
    # rank 0 decides from its file system and tells the others, so that every rank stops or goes on together
    done = dist.broadcast(rank() == 0 and not args.overwrite and complete
                          and same_settings(marker, vars(args), inputs, ignore=("overwrite", "dist_timeout")))
    if done:
        log(f"{args.out}: complete results with the same settings and inputs; nothing to do (--overwrite reruns)\n")
        log(open(os.path.join(args.out, "results.md"), encoding="utf-8").read())
        return
    # ---- checks before anything is written: the output folder, the prompts, the models' folders
    outputs.check_owner(args.out, "evaluate.py", args.overwrite, ours=is_evaluate_output)
    prompts = read_prompts(args.prompts)
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    if not prompts:
        raise WltError(f"{args.prompts}: no prompts")
    log(f"{len(prompts)} prompts from {args.prompts}; policies: {', '.join(f'{n}={p}' for n, p in pols.items())}")
    for path in [*pols.values(), *([args.gold_rm] if args.gold_rm else [])]:
        check_model_dir(path)
    dev = dist.device()
    host = HostMemory(pols.values(), args.trust_remote_code)  # its baseline: code imported, no weights

    # ---- sample every policy (one model in memory at a time). Finished batches of samples and of scores are
    # kept in OUT.partial/ as they are made: a killed evaluation resumes where it stopped. The previous results
    # stay whole until the new ones replace them at the end.
    if args.overwrite and rank() == 0:  # evaluate from scratch, not from an earlier run's batches
        remove_dir(os.path.join(args.out, "results.partial"))
    partial = Partial(os.path.join(args.out, "results"),
                      {"args": {k: v for k, v in vars(args).items() if k not in ("overwrite", "dist_timeout")},
                       "inputs": inputs})
    gen_stats, responses = {}, {}
    for name, path in pols.items():
        responses[name] = dist.broadcast(sample_policy(args, name, path, prompts, dev, gen_stats, partial))

    # ---- gold rewards of the samples, and of D_u's pairs for the label analysis
    weak_done = weak_path and os.path.isfile(weak_path) and os.path.isfile(runs.summary_path(weak_path))
    weak_rows = read_pairs(weak_path, Skips(strict=True)) if weak_done else []  # any layout, as pairs
    lq_rows, sample_note = weak_rows, ""
    if exact_gold:
        gold_name = "exact (synthetic world)"
        gold = {n: [synthetic.gold_reward(p, r[i]) for i, p in enumerate(prompts)] for n, r in responses.items()}
        lq_gold = [(synthetic.gold_reward(r["prompt"], r["chosen"]), synthetic.gold_reward(r["prompt"], r["rejected"])) for r in lq_rows]
    else:
        rm = GoldRM(args.gold_rm, args.rm_format, args.rm_batch_size, args.rm_max_len, dev, args.dtype, args.trust_remote_code)
        gold_name = f"{args.gold_rm} ({rm.fmt} format)"
        gold = {n: rm.score([(p, r[i]) for i, p in enumerate(prompts)], f"gold of policy {n}", partial) for n, r in responses.items()}
        if lq_rows and args.analysis_pairs and len(lq_rows) > args.analysis_pairs:
            pick = sorted(random.Random(args.seed).sample(range(len(lq_rows)), args.analysis_pairs))
            lq_rows = [lq_rows[i] for i in pick]
            sample_note = f"a seeded sample of {len(lq_rows)} of {len(weak_rows)}"
        flat = rm.score([(r["prompt"], r[k]) for r in lq_rows for k in ("chosen", "rejected")], "gold of D_u pairs", partial) if lq_rows else []
        lq_gold = list(zip(flat[0::2], flat[1::2]))
        del rm
    host_figures = host.report()  # per rank: peak host memory and its baseline
    if rank() != 0:
        dist.barrier()
        partial.remove()
        return

    # ---- statistics and tables
    res = {"setup": {"what": args.run_dir or args.out, "gold": gold_name, "prompts": len(prompts),
                     "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed},
           "policies": {}, **host_figures}
    for name, g in gold.items():
        m, se = mean_se(g)
        p = {"path": pols[name], "mean": m, "se": se, "n": len(g), **gen_stats[name],
             "mean_response_words": statistics.fmean(len(r.split()) for r in responses[name].values())}
        if "base" in gold and name != "base":
            p["vs_base"] = m - statistics.fmean(gold["base"])
        if "sft" in gold and name not in ("sft", "base"):
            d, dse = paired_delta(g, gold["sft"])
            p["vs_sft"] = {"delta": d, "se": dse, "z": z_score(d, dse)}
        res["policies"][name] = p
    if "weak" in gold and "human" in gold:
        res["win_rate"] = win_rate(gold["weak"], gold["human"])
    if lq_rows:
        lq = label_quality(lq_rows, lq_gold)
        lq.update(agreement=sum(r["human_agrees"] for r in weak_rows) / len(weak_rows), agreement_pairs=len(weak_rows),
                  sample=sample_note)
        res["label_quality"] = lq
    gens = [{"policy": n, "index": i, "prompt": p, "response": responses[n][i], "gold": gold[n][i]}
            for n in gold for i, p in enumerate(prompts)]
    md = results_markdown(res)
    res.update(args=vars(args), inputs=inputs)
    # written whole under temporary names, then renamed; results.json last: it marks the evaluation complete
    outputs.replace_files([(os.path.join(args.out, "generations.jsonl"), lambda tmp: dump_jsonl(tmp, gens)),
                           (os.path.join(args.out, "results.md"), lambda tmp: dump_text(tmp, md))], marker, res)
    log("\n" + md)
    dist.barrier()
    partial.remove()


if __name__ == "__main__":
    run_main(main)
