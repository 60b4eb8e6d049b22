"""The chores train_sft.py and train_dpo.py share, none of which touches the numbers: their flags and a role's paths
in the run folder, the start of a run (every check, the data, then --out), the batch plan, the optimizer and its
schedule, metrics.jsonl, and the final save. Each trainer's step itself is written out in its own script."""
from __future__ import annotations

import argparse
import json
import math
import os
import random

import torch
import torch.nn as nn

import wlt
from lib import checkpoint, dist, memory, outputs, runs, tracking
from lib.console import WltError, argument_parser, check_ranges, log
from lib.data import Skips, read_pairs, tokenize_pairs, usable_pairs
from lib.dist import rank, world_size
from lib.files import (appended_rows, check_file, fingerprint, read_json, remove_dir, same_settings, what_changed,
                       write_json, write_text)
from lib.models import check_model_dir, check_same_tokenizer, fit_max_len, load_tokenizer


def argument_parser_for(doc: str, kind: str) -> argparse.ArgumentParser:
    """The flags both trainers take; kind "sft" or "dpo" sets the paper's batch size."""
    ap = argument_parser(doc)
    g = ap.add_argument_group("what to train: a role in a run folder, or explicit paths")
    role = g.add_mutually_exclusive_group()
    role.add_argument("--teacher", action="store_true", help="the weak teacher (the small model) of the run")
    role.add_argument("--student", action="store_true", help="the student (the bigger model) of the run")
    g.add_argument("--run-dir", default=None,
                   help=f"run folder made by `python wlt.py prepare` (with --teacher/--student; default "
                        f"{runs.shown(runs.DEFAULT_RUN)}, launch.sh's offline world, prepared on first use); "
                        f"it gives model, data, out and the default settings")
    g.add_argument("--model", default=None, help="HF model name or folder to start from")
    g.add_argument("--data", default=None,
                   help="pair file (.jsonl/.json/.parquet: prompt, chosen, rejected as strings or conversations, "
                        "docs/data.md)")
    g.add_argument("--out", default=None, help="output folder (HF checkpoint, metrics.jsonl, train_config.json)")
    t = ap.add_argument_group("optimisation")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the run's config.json; without a run, SFT 2e-5, DPO 5e-5 "
                        "with LoRA and 5e-7 full)")
    t.add_argument("--epochs", type=int, default=1, help="passes over the data (paper: 1)")
    t.add_argument("--batch-size", type=int, default=32 if kind == "sft" else 16,
                   help="global batch in %s over all processes (paper: SFT 32, DPO 16)"
                        % ("sequences" if kind == "sft" else "pairs"))
    t.add_argument("--micro-batch-size", type=int, default=None,
                   help="per-process micro-batch; gradients accumulate up to --batch-size (default: no accumulation)")
    t.add_argument("--max-len", type=int, default=512,
                   help="tokens per sequence; longer prompts lose tokens from the left (default: the run's, the "
                        "length prepare filtered at; else 512)")
    t.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup share of the steps, then cosine to 0")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--seed", type=int, default=0, help="seed of data order and LoRA init (the same on every process)")
    t.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps (0: all epochs); the schedule fits them")
    o = ap.add_argument_group("bookkeeping")
    o.add_argument("--eval-pairs", type=int, default=64, help="held-out slice of the data, excluded from training (0: none)")
    o.add_argument("--eval-every", type=int, default=50, help="evaluate the held-out slice every N steps (and at the end)")
    o.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU")
    o.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block's activations in backward instead of storing them "
                        "(less memory, about one more forward of compute); DPO then runs prompts unshared")
    o.add_argument("--resume", action="store_true",
                   help="continue from --out's newest mid-run checkpoint when it was made with the same settings and "
                        "inputs; exit at once if --out holds a finished run with the same settings and inputs")
    o.add_argument("--save-every", type=int, default=100,
                   help="write a mid-run checkpoint (trainable weights, optimizer, scheduler, RNG, step) every N "
                        "steps (0: never)")
    o.add_argument("--save-dtype", choices=["auto", *checkpoint.SAVE_DTYPES], default="auto",
                   help="dtype of the final checkpoint's weights (auto: the dtype in the starting model's config, "
                        "fp32 when it names none); training and mid-run checkpoints keep fp32 master weights")
    o.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                   help="the final checkpoint is split into files of at most this size (5GB, 500MB, ...) with an "
                        "index file, as save_pretrained does; a single tensor larger than it gets a file of its own")
    o.add_argument("--report-to", choices=tracking.REPORT_TO, default="none",
                   help="also send the metrics, under TRL's names, to TensorBoard (OUT/tensorboard/) or Weights & "
                        "Biases; needs that package installed (docs/training.md)")
    o.add_argument("--overwrite", action="store_true",
                   help="train again even when --out holds a finished run, or write into a folder that is not a "
                        "trainer's output (the previous output stays until the new one is complete)")
    o.add_argument("--strict", action="store_true", help="turn every skipped row into an error")
    o.add_argument("--dist-timeout", type=float, default=dist.DIST_TIMEOUT_MIN,
                   help="minutes a process waits for the others in a collective under torchrun (rank 0 alone loads "
                        "the model and writes the final checkpoint meanwhile)")
    o.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model folder/hub (only from the command line, never from a run's "
                        "config.json)")
    return ap


def _shard_size(text: str) -> int:
    try:
        return checkpoint.shard_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# the range of each numeric flag both trainers take (checked once they are parsed; train_dpo.py adds its own)
RANGES = {"lr": ">= 0", "epochs": ">= 1", "batch_size": ">= 1", "micro_batch_size": ">= 1", "max_len": ">= 1",
          "warmup_ratio": "in [0, 1]", "weight_decay": ">= 0", "max_grad_norm": ">= 0", "max_steps": ">= 0",
          "eval_pairs": ">= 0", "eval_every": ">= 1", "save_every": ">= 0", "dist_timeout": "> 0"}


# settings a run's config.json may not give: each is the user's decision, made on the command line
COMMAND_LINE_ONLY = {"trust_remote_code": "allows a model's own code",
                     "overwrite": "may replace a finished output or write into a folder of other files"}


def parse_args(ap: argparse.ArgumentParser, script: str, roles: dict) -> tuple[argparse.Namespace, dict]:
    """Parse the flags. With --teacher/--student, model/data/out come from the role in the run folder (the
    script's ROLES: role -> (model, data, out) relative to the run folder) and the defaults from its config.json;
    explicit flags always win. Returns (args, the run's settings that are not flags, e.g. DPO's lr_lora / lr_full)."""
    args, _ = ap.parse_known_args()
    extra = {}
    if args.teacher or args.student:
        run = os.path.abspath(args.run_dir or runs.DEFAULT_RUN)  # one spelling, so reruns compare equal
        role = "teacher" if args.teacher else "student"
        key = role if role in roles else f"{role} --labels {getattr(args, 'labels', None)}"
        if key not in roles:
            raise WltError(f"--{role} needs " + " or ".join(f"--labels {k.split()[-1]} ({roles[k][1]})"
                                                          for k in roles if k.startswith(role)))
        runs.prepare_if_default(run, args.dist_timeout)
        given = {k: getattr(args, k) for k in ("model", "data", "out")}
        d = runs.run_defaults(run, script, role)
        for name, what in COMMAND_LINE_ONLY.items():  # the user's decisions, on the command line
            if name in d:
                raise WltError(f"{os.path.join(run, 'config.json')}: sets {name} (train.{script}.{role}); remove it: "
                               f"only --{name.replace('_', '-')} on the command line {what}")
        d.update(runs.role_paths(run, roles[key], given), run_dir=run)
        ap.set_defaults(**{k: v for k, v in d.items() if k in vars(args)})
        extra = {k: v for k, v in d.items() if k not in vars(args)}
    elif args.run_dir:
        ap.error("--run-dir needs --teacher or --student")
    args = ap.parse_args()
    for k in ("model", "data", "out"):
        if getattr(args, k) is None:
            ap.error(f"--{k} is required (or --teacher / --student: a stage of the run in --run-dir)")
    check_ranges(ap, args, **RANGES)
    outs = {"--out": args.out, "--out's staging folder": outputs.staging(args.out),
            "--out's replaced folder": outputs.replaced(args.out), "--out's lock": outputs.lock_path(args.out)}
    outputs.check_apart(outs, {f"--{k}": getattr(args, k, None) for k in ("model", "data", "ref")})
    if os.path.islink(args.out.rstrip(os.sep)):  # the final switch exchanges folders: it would move the link
        raise WltError(f"--out {args.out} is a symbolic link; pass the folder it points to, "
                       f"{os.path.realpath(args.out)}")
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
    if kind == "sft":  # SFT reads the chosen response only
        exs = [dict(e, rejected_ids=[]) for e in exs]
    kept = [exs[i] for i in usable_pairs(exs, locs, args.max_len, skips,
                                         responses=("chosen",) if kind == "sft" else ("chosen", "rejected"))]
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


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Global batches per epoch of batch_plan: plan[step] belongs to epoch step // steps_per_epoch."""
    return -(-n // batch_size)


def micro_batch_size(args) -> int:
    return args.micro_batch_size or max(1, args.batch_size // world_size())


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


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


def stop_if_not_finite(what: str, value: float, step: int) -> None:
    """A NaN or infinite loss or gradient norm ends training before the optimizer update of `step`."""
    if not math.isfinite(value):
        raise WltError(f"{what} is {value} at step {step}; stopping before the update, nothing saved from this "
                           f"step (the last checkpoint, if any, is intact)")


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per step, written by rank 0 only; with --report-to, each row goes to
    that tracker too (lib/tracking.py). A resumed run (start > 0) keeps the rows of steps 1..start and drops
    later ones, written after the checkpoint it resumes from, so that every step appears exactly once."""

    def __init__(self, args, start: int = 0):
        self.f, self.tracker = None, None
        if rank() != 0:
            return
        if args.report_to != "none":
            self.tracker = tracking.Tracker(args.report_to, args.out, vars(args))
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "metrics.jsonl")
        kept = appended_rows(path) if start and os.path.isfile(path) else []
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept if r.get("step", 0) <= start))  # atomically
        self.f = open(path, "a")

    def write(self, row: dict) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        if self.tracker:
            self.tracker.log(row)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.f:
            self.f.close()
        if self.tracker:
            self.tracker.close()
        return False


# ----------------------------------------------------------------------------------------------------------
# start and end of a training run


def checkpoint_settings(args) -> dict:
    """The settings a checkpoint must share with the run that resumes it (how often it is saved, and how the final
    model is written, do not matter)."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "save_every", "save_dtype", "max_shard_size",
                                                              "report_to", "overwrite", "dist_timeout")}


def finished_run(marker: str, settings: dict, inputs: dict) -> tuple[bool, bool, str]:
    """Whether `marker` marks a finished run in --out, whether it has the same settings and inputs, and if not,
    which differ (files.what_changed)."""
    if not os.path.isfile(marker):
        return False, False, ""
    ignore = ("resume", "save_every", "overwrite", "report_to", "dist_timeout")
    if same_settings(marker, settings, inputs, ignore=ignore):
        return True, True, ""
    try:
        prev = read_json(marker)
    except (OSError, json.JSONDecodeError):
        return True, False, "its train_config.json is unreadable"
    return True, False, what_changed(prev if isinstance(prev, dict) else {}, settings, inputs, ignore)


def begin(args, kind: str) -> tuple | None:
    """Start of a training run, under --out's lock (the script holds it, outputs.locked): every check first,
    then --out. Reads only: --out's owner, the models (a trainer's output must be finished; a cut final switch is
    completed first) with their configs (--max-len capped to the positions) and tokenizers (--model and --ref must
    share one), whether --out holds a finished run, and the data (read, tokenized, the held-out slice carved).
    Returns None when there is nothing to do: a finished run with the same settings and unchanged inputs. Only
    then is --out touched: marked as this trainer's (written_by.json), and, unless --resume, cleared of an old
    mid-run checkpoint. A finished output stays whole and marked until save_final switches the new one in.
    Returns (the inputs' fingerprints, tokenizer, train pairs, held-out pairs, data stats)."""
    script = f"train_{kind}.py"
    tracking.require(args.report_to)  # a missing tracker package stops the run before it starts
    marker = os.path.join(args.out, "train_config.json")
    if rank() == 0 and outputs.cut_swap(args.out):  # a kill inside the last switch of --out: complete it
        outputs.finish_swap(args.out, "train_config.json")
        log(f"--out {args.out}: completed the final save that a kill had cut (the new output switched in whole)")
    dist.barrier()
    ref = getattr(args, "ref", None) if not getattr(args, "reference_free", False) else None
    outputs.check_model_inputs({"--model": args.model, "--ref": ref})
    # whose folder --out is: rank 0 looks and every rank gets its verdict (the ranks of several nodes may see
    # other files there)
    outputs.on_rank_0(outputs.check_owner, args.out, script, args.overwrite, folders=outputs.TRAINER_FOLDERS)
    check_file(args.data)
    for key, path in (("model", args.model), ("ref", ref)):
        if path:
            check_model_dir(path)
            fit_max_len(args, path, f"--{key}")
    tok = None
    if ref and os.path.abspath(ref) != os.path.abspath(args.model):  # the reference scores the policy's token ids
        tok = load_tokenizer(args.model, args.trust_remote_code)
        check_same_tokenizer(("--model", args.model, tok), ("--ref", ref, load_tokenizer(ref, args.trust_remote_code)))
    inputs = {k: fingerprint(getattr(args, k, None)) for k in ("model", "data", "ref")}
    # whether --out holds a finished run, of the same settings, and what changed: rank 0 decides from its file
    # system and tells the others (ranks that saw different files would run different collectives and hang)
    finished, same, changed = dist.broadcast(finished_run(marker, vars(args), inputs) if rank() == 0 else None)
    if finished:
        if same and not args.overwrite:
            log(f"{args.out}: finished run with the same settings and inputs found; nothing to do (--overwrite "
                f"trains again)")
            if args.resume and rank() == 0:  # a kill inside save_final can leave the last checkpoint behind
                checkpoint.remove_checkpoints(args.out)
            return None
        if not (args.resume or args.overwrite):
            raise WltError(f"{args.out}: holds a finished run of other settings or inputs ({changed}); nothing done. "
                           f"Pass --overwrite to train again (the finished run stays until the new one is complete), "
                           f"or choose another --out")
        log(f"{args.out}: " + ("training again (--overwrite)" if same else
                               f"settings or inputs changed since the finished run there ({changed}); training again")
            + "; the finished run stays there until the new one is complete")
    tok = tok or load_tokenizer(args.model, args.trust_remote_code)
    train, evals, stats = load_examples(args, tok, kind)
    steps = len(batch_plan(len(train), args.batch_size, args.epochs, args.seed, args.max_steps))
    if args.save_every and args.save_every < steps:  # mid-run checkpoints need a recent torch: say so now
        checkpoint.require_dcp()
    if rank() == 0:  # every check passed: from here on --out is written
        outputs.claim(args.out, script)
        if not args.resume:  # a fresh start: an old mid-run checkpoint must not be picked up later
            checkpoint.remove_checkpoints(args.out)
    dist.barrier()
    return inputs, tok, train, evals, stats


def save_final(args, model: nn.Module, tok, unique_keys: set, opt, stats: dict, inputs: dict) -> None:
    """The end of a training run: the full state dict gathered to rank 0 (a collective under FSDP2), written as
    an HF checkpoint; with LoRA, the merged model plus adapter/ in PEFT's layout. Then train_config.json, last:
    the script, the resolved settings (trust_remote_code among them), data counts, per-rank memory, the inputs'
    fingerprints and the files of the output; its presence marks a complete output. All of it is written into
    OUT.staging/ beside --out and switched in whole (outputs.swap_in); then the mid-run checkpoint is removed. The
    model is written as a user publishes it: in the dtype it came in (or --save-dtype), in shards."""
    stats["memory"] = memory.memory_report(model, opt)  # per-rank shards: 1/N of one process's under FSDP2
    opt.state.clear()  # the AdamW moments are not needed any more: room for the gathered and cast weights
    sd = dist.full_state_dict(model)
    lora = getattr(model, "wlt_lora", None)
    if rank() == 0:
        dtype = (checkpoint.SAVE_DTYPES[args.save_dtype] if args.save_dtype != "auto"
                 else checkpoint.config_dtype(args.model, args.trust_remote_code))
        stats["saved_dtype"] = str(dtype).removeprefix("torch.")
        stage = outputs.staging(args.out)
        remove_dir(stage)
        try:
            if lora:
                merged, adapter = wlt.split_lora_state_dict(sd, lora)
                sd = None  # merged holds what the save needs; it drops each tensor once written
                checkpoint.save_hf_checkpoint(stage, merged, model, tok, unique_keys, dtype, args.max_shard_size)
                checkpoint.save_adapter(stage, adapter, lora, os.path.abspath(args.model))
            else:
                checkpoint.save_hf_checkpoint(stage, sd, model, tok, unique_keys, dtype, args.max_shard_size)
            write_json(os.path.join(stage, "train_config.json"),
                       {"script": f"train_{'dpo' if hasattr(args, 'beta') else 'sft'}.py", "args": vars(args),
                        "data": stats, "inputs": inputs, "files": sorted(os.listdir(stage)),
                        "generation": outputs.next_generation(args.out, "train_config.json")})
        except BaseException:  # a failure or a signal while writing: no half-written staging folder stays
            remove_dir(stage)
            raise
        outputs.swap_in(args.out, "train_config.json")
        log(f"saved {args.out}")
        checkpoint.remove_checkpoints(args.out)
    dist.barrier()
