"""The weak teacher labels the unlabeled pairs (wlt.py, Eq. 5): for each pair (x, y1, y2),
r(x, y) = beta * log(pi_w(y|x) / pi_ref(y|x)) with log-probs summed over the response tokens; the response
with the higher reward becomes "chosen".

    torchrun label.py --teacher                        the default run: data/unlabeled.jsonl -> data/weak.jsonl
    torchrun --nproc_per_node 2 label.py --teacher --run-dir runs/demo
    python label.py --model PI_W --ref PI_REF --data pairs.jsonl --out weak.jsonl [--beta 0.1]

PI_W is a merged checkpoint, or a folder with adapter/ (as train_dpo.py writes) on top of PI_REF: then one
model is loaded and its adapter switched on (pi_w) and off (pi_ref). Under torchrun every process labels a
disjoint share of the pairs and rank 0 writes them in the input order. Output rows: prompt, chosen, rejected
(the teacher's order), chosen_reward, rejected_reward, human_agrees, plus every other field of the input row;
each row in the layout it was read in (conversational rows stay conversations; an implicit-prompt row keeps
whole conversations and no prompt field).
OUT.summary.json beside the output, written last, marks it complete (docs/scripts.md lists its fields).
"""
import argparse
import os
import statistics
import time

import torch

import wlt
from lib import checkpoint, dist, outputs, runs
from lib.console import WltError, argument_parser, check_ranges, log
from lib.data import Skips, in_batches, pad_id, pair_key, pair_to_row, read_pairs, relabeled_row, tokenize_pairs, usable_pairs
from lib.dist import rank, world_size
from lib.files import check_file, dump_jsonl, fingerprint, read_json, remove_dir, same_settings
from lib.memory import HostMemory
from lib.models import check_model_dir, check_same_tokenizer, fit_max_len, load_model, load_tokenizer, pack_setting
from lib.outputs import Partial, run_batches
from lib.signals import run_main


def build_parser() -> argparse.ArgumentParser:
    ap = argument_parser(__doc__)
    g = ap.add_argument_group("what to label: the run's weak teacher, or explicit paths")
    g.add_argument("--teacher", action="store_true",
                   help="pi_w = teacher/dpo (its adapter on teacher/sft when present), pi_ref = teacher/sft, "
                        "data/unlabeled.jsonl -> data/weak.jsonl, beta of the teacher's DPO")
    g.add_argument("--run-dir", default=None,
                   help=f"run folder (with --teacher; default {runs.shown(runs.DEFAULT_RUN)})")
    g.add_argument("--model", default=None, help="pi_w: merged checkpoint, or a folder with adapter/ on top of --ref")
    g.add_argument("--ref", default=None, help="pi_ref: the reference the teacher was trained from (its SFT model)")
    g.add_argument("--data", default=None, help="pair file to label (.jsonl/.json/.parquet, any layout of docs/data.md)")
    g.add_argument("--out", default=None, help="labeled pair file to write (.jsonl)")
    o = ap.add_argument_group("labeling")
    o.add_argument("--beta", type=float, default=None,
                   help="beta of Eq. 5 (default: the teacher's DPO beta with --teacher, else 0.1). It scales the "
                        "rewards, never the labels")
    o.add_argument("--batch-size", type=int, default=16,
                   help="pairs per batch (pairs of similar length are batched together)")
    o.add_argument("--share-prompt", choices=["auto", "on", "off"], default="auto",
                   help="run each prompt once for both responses (auto: for the families in wlt.PACK_FAMILIES); the "
                        "same rewards as off up to fp32 rounding, fewer tokens through the model")
    o.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence; longer prompts lose tokens from the left (default: the run's, else 512)")
    o.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto = bf16 autocast on CUDA, fp32 on CPU")
    o.add_argument("--strict", action="store_true", help="turn every skipped row into an error")
    o.add_argument("--overwrite", action="store_true",
                   help="relabel even if a complete output with the same settings exists, or replace a file that "
                        "is not label.py's output")
    o.add_argument("--dist-timeout", type=float, default=dist.DIST_TIMEOUT_MIN,
                   help="minutes a process waits for the others in a collective under torchrun")
    o.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model folder/hub (only from the command line)")
    return ap


def parse_args() -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args()
    if args.teacher:
        resolve_teacher(args)
    elif args.run_dir:
        ap.error("--run-dir needs --teacher (label.py labels with the run's weak teacher)")
    for k in ("model", "ref", "data", "out"):
        if getattr(args, k) is None:
            ap.error(f"--{k} is required (or --teacher: the weak teacher of the run in --run-dir)")
    args.beta = 0.1 if args.beta is None else args.beta
    args.max_len = 512 if args.max_len is None else args.max_len
    check_ranges(ap, args, beta="> 0", batch_size=">= 1", max_len=">= 1", dist_timeout="> 0")
    if os.path.realpath(args.model) == os.path.realpath(args.ref):  # labels by a hash of the texts, not a teacher
        raise WltError(f"--model and --ref are the same model ({args.model}): every reward beta*log(pi_w/pi_ref) would "
                       f"be 0 and every label a tie; --model is the teacher trained with DPO, --ref the model it "
                       f"started from")
    outputs.check_apart({"--out": args.out, "--out's summary": runs.summary_path(args.out),
                         "--out's partial results": args.out + ".partial",
                         "--out's lock": outputs.lock_path(args.out)},
                        {"--data": args.data, "--model": args.model, "--ref": args.ref})
    return args


def check_out(args) -> None:
    """--out may be replaced when it is absent, label.py's output (its summary, or a partial run, beside it), or
    --overwrite was given; a folder never."""
    if os.path.isdir(args.out):
        raise WltError(f"--out {args.out} is a folder; label.py writes a .jsonl file: name one")
    ours = os.path.isfile(runs.summary_path(args.out)) or os.path.isfile(os.path.join(args.out + ".partial", "meta.json"))
    if os.path.exists(args.out) and not ours and not args.overwrite:
        raise WltError(f"--out {args.out}: a file that is not label.py's output (no "
                           f"{os.path.basename(runs.summary_path(args.out))} beside it); choose another --out, or "
                           f"pass --overwrite to replace it")


def resolve_teacher(args) -> None:
    """--teacher: the run's teacher and data, unless given explicitly; both models must be finished trainings."""
    run = args.run_dir = os.path.abspath(args.run_dir or runs.DEFAULT_RUN)
    runs.prepare_if_default(run, args.dist_timeout)
    cfg = runs.read_run_config(run)
    for key, stage, sub in (("ref", "teacher/sft", "sft"), ("model", "teacher/dpo", "dpo")):
        if getattr(args, key) is None:
            runs.require(run, stage)
            setattr(args, key, os.path.join(run, "teacher", sub))
        elif not os.path.isfile(os.path.join(getattr(args, key), "train_config.json")):
            raise WltError(f"{getattr(args, key)}: no finished training there (no train_config.json); "
                               f"train the teacher first")
    args.data = args.data or os.path.join(run, "data", "unlabeled.jsonl")
    args.out = args.out or os.path.join(run, "data", "weak.jsonl")
    if args.beta is None:  # the beta the teacher was trained with (DPO_ARGS may have overridden the run's)
        args.beta = read_json(os.path.join(args.model, "train_config.json"))["args"].get("beta", cfg.get("beta", 0.1))
    if args.max_len is None:  # the run's length limit, so D_u keeps every pair the human-label student sees
        args.max_len = cfg.get("max_len", 512)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def teacher_tokenizer(args):
    """The tokenizer whose ids both models score: --ref's. --model's own, where it has one (a merged checkpoint,
    or the tokenizer files train_dpo.py writes beside adapter/), must be the same (models.check_same_tokenizer),
    or one line names both before any weights are read."""
    tok = load_tokenizer(args.ref, args.trust_remote_code)
    local = os.path.isdir(args.model)
    if not local or any(os.path.isfile(os.path.join(args.model, f)) for f in TOKENIZER_FILES):
        check_same_tokenizer(("--model", args.model, load_tokenizer(args.model, args.trust_remote_code)),
                             ("--ref", args.ref, tok))
    return tok


def load_teacher(args, dev: torch.device):
    """(pi_w, pi_ref or None, description). pi_ref None: pi_w with its adapter switched off.

    Each model is read once, in the compute dtype (bf16 on CUDA, fp32 on CPU), and placed on `dev` before
    the next is read (lib.models.load_model). With an adapter there is one model: the base with the adapter
    on is pi_w, with it off (wlt.lora_disabled) pi_ref."""
    adapter = os.path.join(args.model, "adapter")
    has_adapter = os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    for path in (args.ref,) if has_adapter else (args.ref, args.model):  # an adapter-only folder is fine
        check_model_dir(path)
    dtype = dist.compute_dtype(dev, args.dtype)
    ref = load_model(args.ref, args.trust_remote_code, dtype, dev).eval()
    if has_adapter:
        base = read_json(os.path.join(adapter, "adapter_config.json")).get("base_model_name_or_path")
        if base and os.path.exists(base) and os.path.abspath(base) != os.path.abspath(args.ref):
            log(f"warning: {adapter} was trained on {base}, applied here on --ref {args.ref}")
        checkpoint.load_adapter(ref, adapter)
        return ref, None, f"adapter {adapter} on/off over {args.ref}"
    pol = load_model(args.model, args.trust_remote_code, dtype, dev).eval()
    return pol, ref, f"two models: {args.model} / {args.ref}"


def label_batch(idx: list[int], exs: list[dict], pol, ref, pad: int, share: bool) -> dict:
    """{pair index: {"pi_w": [log pi_w(y1), log pi_w(y2)], "pi_ref": [log pi_ref(y1), log pi_ref(y2)]}}, y1 the
    input's chosen response and y2 its rejected one, each prompt run once per model for both when share
    (wlt.pair_logps)."""
    batch = [exs[i] for i in idx]
    # the output head in fp32 under bf16 autocast too: bf16 logits move a real response's log-prob by ~0.1 nat,
    # as much as many a pair's margin (docs/scaling.md measures it)
    logps_w = wlt.pair_logps(pol, batch, pad, share, head_dtype=torch.float32)          # [B, 2] under pi_w
    if ref is None:  # one model: its adapter off is pi_ref
        with wlt.lora_disabled(pol):
            logps_ref = wlt.pair_logps(pol, batch, pad, share, head_dtype=torch.float32)  # [B, 2] under pi_ref
    else:
        logps_ref = wlt.pair_logps(ref, batch, pad, share, head_dtype=torch.float32)
    w, r = logps_w.float().cpu().tolist(), logps_ref.float().cpu().tolist()
    return {i: {"pi_w": w[j], "pi_ref": r[j]} for j, i in enumerate(idx)}


def summarize(rows: list[dict], n_rows: int, skips: Skips, fallbacks: int, seconds: float, resumed: int,
              how: str, host: dict) -> dict:
    margins = [r["chosen_reward"] - r["rejected_reward"] for r in rows]
    summary = {
        "rows": n_rows, "labeled": len(rows), "skipped": skips.as_dict(), "tokenizer_fallbacks": fallbacks,
        "agreement_with_input": sum(r["human_agrees"] for r in rows) / len(rows),
        "reward_margin": {"mean": statistics.fmean(margins), "std": statistics.pstdev(margins),
                          "min": min(margins), "median": statistics.median(margins), "max": max(margins),
                          "ties": sum(m == 0 for m in margins)},
        "chosen_reward_mean": statistics.fmean(r["chosen_reward"] for r in rows),
        "rejected_reward_mean": statistics.fmean(r["rejected_reward"] for r in rows),
        "pairs_per_s": (len(rows) - resumed) / max(seconds, 1e-9), "seconds": seconds, "resumed_pairs": resumed,
        "processes": world_size(), "teacher": how, **host,
    }
    if all("gold_chosen" in r and "gold_rejected" in r for r in rows):  # synthetic world: exact gold rewards
        summary["gold_accuracy"] = {
            "weak": sum(r["gold_chosen"] > r["gold_rejected"] for r in rows) / len(rows),
            "input": sum(r["gold_chosen"] != r["gold_rejected"] and (r["gold_chosen"] > r["gold_rejected"]) == r["human_agrees"]
                         for r in rows) / len(rows)}
    return summary


def main():
    args = parse_args()
    dist.init_distributed(args.dist_timeout)  # every process, before rank 0 takes the lock for them
    with outputs.locked(args.out):  # this run alone writes --out and its partial results, to its end
        run(args)


def run(args):
    """The labeling: every check, the data and the teacher, the log-probs batch by batch, the output."""
    # ---- checks first, reading only: the models (finished trainings, one tokenizer) and their positions, the
    # output, then the data (below)
    outputs.check_model_inputs({"--model": args.model, "--ref": args.ref})
    check_file(args.data)
    check_model_dir(args.ref)
    for flag in ("--ref", "--model"):
        path = getattr(args, flag[2:])
        if os.path.isfile(os.path.join(path, "config.json")):  # an adapter-only folder has no config of its own
            fit_max_len(args, path, flag)
    tok = teacher_tokenizer(args)
    inputs = {k: fingerprint(getattr(args, k)) for k in ("model", "ref", "data")}
    marker = runs.summary_path(args.out)
    check_out(args)
    # rank 0 decides from its file system and tells the others, so that every rank stops or goes on together
    done = dist.broadcast(rank() == 0 and not args.overwrite and os.path.isfile(args.out)
                          and same_settings(marker, vars(args), inputs, ignore=("overwrite", "dist_timeout")))
    if done:
        log(f"{args.out}: already labeled with the same settings and inputs; nothing to do (--overwrite relabels)")
        return
    dev = dist.device()

    # ---- setup: the data, read and tokenized by every process (cheap next to the forwards); the teacher
    skips, locs, layouts = Skips(strict=args.strict), [], []
    pairs = read_pairs(args.data, skips, locs, layouts)
    host = HostMemory([args.ref, args.model], args.trust_remote_code)  # its baseline: code imported, no weights
    pol, ref, how = load_teacher(args, dev)
    log(f"teacher: {how}; beta {args.beta}; {world_size()} process(es) on {dev}")
    n_rows = len(pairs) + skips.total()
    exs, fallbacks = tokenize_pairs(tok, pairs, desc=f"tokenize {args.data}")
    todo = usable_pairs(exs, locs, args.max_len, skips)  # indices into pairs of the rows that can be labeled
    skips.report(args.data)
    if not todo:
        raise WltError(f"{args.data}: no pairs to label")
    # batches of similar length (less padding), longest first, fixed by the data alone: 1 and N processes, and
    # a resumed run, compute exactly the same numbers
    lengths = [len(exs[i]["prompt_ids"]) + max(len(exs[i]["chosen_ids"]), len(exs[i]["rejected_ids"])) for i in todo]
    batches = [[todo[j] for j in b] for b in in_batches(lengths, args.batch_size)]
    share = pack_setting(args.share_prompt, pol)

    # ---- the log-probs, batch by batch; finished batches are kept in OUT.partial/ as they are made, so a
    # killed run resumes where it stopped. From here on, files are written: the previous output and its summary
    # stay whole until the new ones replace them at the end
    if args.overwrite and rank() == 0:  # relabel from scratch, not from an earlier run's batches
        remove_dir(args.out + ".partial")
    partial = Partial(args.out, {"args": {k: v for k, v in vars(args).items() if k not in ("overwrite", "dist_timeout")},
                                 "inputs": inputs,
                                 "values": "pi_w, pi_ref"})
    resumed = sum(len(b) for k, b in enumerate(batches) if f"label:{k}" in partial.done)  # labeled before a kill
    t0 = time.time()
    with torch.inference_mode(), dist.autocast(dev, args.dtype):
        logps = run_batches(batches, partial, label_batch, exs, pol, ref, pad_id(tok), share,
                            tag="label", desc="label", unit="pair")
    seconds = time.time() - t0
    host_figures = host.report(pol, ref)  # per rank: peak host memory, its baseline, the weights held
    if rank() != 0:  # rank 0 has every pair's log-probs and writes the output
        dist.barrier()
        partial.remove()
        return

    # ---- Eq. 5 on the summed log-probs: the rewards of y1 (the input's chosen response) and y2, and the weak label;
    # then each pair in the teacher's order
    logps_w = torch.tensor([logps[i]["pi_w"] for i in todo], dtype=torch.float64)      # [N, 2]: y1, y2
    logps_ref = torch.tensor([logps[i]["pi_ref"] for i in todo], dtype=torch.float64)  # [N, 2]
    reward = wlt.implicit_reward(logps_w, logps_ref, args.beta)                        # [N, 2]
    tie_break = torch.tensor([wlt.text_tie_break(pair_key(pairs[i]["chosen"]), pair_key(pairs[i]["rejected"]))
                              for i in todo])
    teacher_agrees = wlt.prefers_first(reward[:, 0], reward[:, 1], tie_break)           # [N]: y1 stays chosen
    ties = int((reward[:, 0] == reward[:, 1]).sum())
    if ties:
        log(f"warning: {ties} pair(s) with exactly equal rewards (is pi_w different from pi_ref?); broken by a "
            f"hash of the two texts, not by the input order")
    rows = [relabeled_row(pairs[i], bool(teacher_agrees[k]), float(reward[k, 0]), float(reward[k, 1]))
            for k, i in enumerate(todo)]
    written = [pair_to_row(r, layouts[i]) for r, i in zip(rows, todo)]  # as each row was read
    summary = summarize(rows, n_rows, skips, fallbacks, seconds, resumed, how, host_figures)
    summary.update(args=vars(args), inputs=inputs)
    # the output written whole under a temporary name, then renamed; the summary last: it marks it complete
    outputs.replace_files([(args.out, lambda tmp: dump_jsonl(tmp, written))], marker, summary)
    dist.barrier()
    partial.remove()
    log(f"wrote {args.out}: {len(rows)} pairs, agreement with the input order {summary['agreement_with_input']:.3f}, "
        f"{summary['pairs_per_s']:.1f} pairs/s" + (f", {skips.total()} skipped" if skips.total() else "")
        + ("; gold accuracy weak {weak:.3f} / input {input:.3f}".format(**summary["gold_accuracy"])
           if "gold_accuracy" in summary else ""))


if __name__ == "__main__":
    run_main(main)
