"""Speed and memory of wlt against a plain baseline, measured in one run on this machine (as in nanoGPT's
bench.py: ratios, not absolute numbers, are what carries over between machines).

    python extras/bench.py                    SmolLM2-135M's shape (random weights), HH-like lengths
    python extras/bench.py --model opt-125m   OPT-125M's shape
    python extras/bench.py --model tiny       a seconds-long smoke run (what the tests use)

The baseline is the common implementation: both models in memory, chosen and rejected as two full sequences
(prompt included, concatenated into one batch), full fp32 logits [2B, T, V], log_softmax of the same size,
gather; in DPO the reference runs inside every step; SFT takes the cross-entropy of the full logits.
wlt is the library's own path: wlt.pair_logps (prompt once per pair, its KV cache shared by both responses;
only response positions projected onto the vocabulary, in chunks, recomputed in backward), length-bucketed
batches for labeling, the reference computed once before the DPO loop (timed apart: "ref once"), and
wlt.response_logps + wlt.sft_loss for SFT. Both sides start from the same random weights and the same token
ids, and the run stops with an error if they disagree: labeling log-probs and labels, the first DPO loss and
gradient norm, the SFT loss.

Each (task, side) runs in its own process. Peak memory is that process's peak minus its resident size after
the weights are loaded (on Linux the peak is reset through /proc/self/clear_refs; on CUDA,
torch.cuda.max_memory_allocated). "FLOP/s share" is the matmul FLOPs the side executed (counted with
torch.utils.flop_counter, padding included) per second, over the fp32 matmul FLOP/s this machine reaches on
a 2048^3 product measured in the same run.
"""
import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's root
import wlt  # noqa: E402
from lib import dist, files, resumable  # noqa: E402

SHAPES = {  # the model shapes of the paper's teacher class (published configs), random weights
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "opt-125m": dict(model_type="opt", vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
                     do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, bos_token_id=2,
                     eos_token_id=2, pad_token_id=1),
    "tiny": dict(model_type="llama", vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0),
}


# ---------------------------------------------------------------------------------------------------------
# the same inputs and weights on both sides

def make_pairs(n: int, vocab: int, seed: int, prompt=(90, 160), response=(20, 70)) -> list[dict]:
    """n tokenized pairs at HH-RLHF-like lengths (prompt ~125 tokens, responses ~45, uniform ranges)."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
    return [{"prompt_ids": ids(*prompt), "chosen_ids": ids(*response) + [2], "rejected_ids": ids(*response) + [2]}
            for _ in range(n)]


def build(shape: str, seed: int, noise: float = 0.0):
    """A causal LM of the named shape with seeded random weights (+ seeded noise: a 'trained' copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(SHAPES[shape])
    kind = cfg.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **cfg), dtype=torch.float32)
    if noise:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std().clamp(min=1e-3) * torch.randn(p.shape, generator=g))
    return model.eval()


def add_lora(model, seed: int):
    """LoRA rank 8 (paper) with a non-zero B, so the policy differs from its reference at step 1."""
    torch.manual_seed(seed)
    wlt.add_lora(model, 8, 16.0)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for m in wlt.lora_modules(model):
            m.lora_B.weight.copy_(0.01 * torch.randn(m.lora_B.weight.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------------------
# the baseline: full logits, log_softmax, gather

def full_logits_logps(model, exs: list[dict], pad: int, dev) -> torch.Tensor:
    """[B, 2] the common way: chosen and rejected as 2B full sequences through wlt.response_logps_plain, the
    definition of log pi(y|x), with its [2B, T, V] fp32 logits."""
    b = {k: v.to(dev) for k, v in wlt.collate_pairs(exs, pad).items()}
    return torch.stack(wlt.response_logps_plain(model, **b).chunk(2), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# measurement helpers

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


class Peak:
    """Peak memory of the code run inside, above what was resident when it started (bytes)."""

    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (the peak) to the current RSS
                f.write("5")
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = _status("VmHWM") - self.base


def timed(step, items: list, dev) -> tuple[list[float], int]:
    """Run step(item) for each item: (seconds of each, peak memory above the start in bytes)."""
    times = []
    with Peak(dev) as peak:
        for item in items:
            sync(dev)
            t0 = time.perf_counter()
            step(item)
            sync(dev)
            times.append(time.perf_counter() - t0)
    return times, peak.bytes


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(dev, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    best = float("inf")
    for _ in range(reps + 1):
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# ---------------------------------------------------------------------------------------------------------
# the three workloads, one side each (run in a fresh process)

def work_label(args, side: str, dev) -> dict:
    """Label args.pairs pairs with pi_w and pi_ref: [N, 4] log-probs, pairs/s, peak memory."""
    pi_ref = build(args.model, args.seed).to(dev)
    pi_w = build(args.model, args.seed, noise=0.02).to(dev)
    pairs = make_pairs(args.pairs, pi_ref.config.vocab_size, args.seed)
    pad = pi_ref.config.pad_token_id
    if side == "baseline":
        batches = [list(range(s, min(s + args.label_batch, len(pairs)))) for s in range(0, len(pairs), args.label_batch)]

        def run(idx):
            exs = [pairs[i] for i in idx]
            return torch.cat([full_logits_logps(pi_w, exs, pad, dev), full_logits_logps(pi_ref, exs, pad, dev)], 1)
    else:  # label.py: length-bucketed batches, prompt shared, lean head
        lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
        batches = resumable.in_batches(lengths, args.label_batch)

        def run(idx):
            exs = [pairs[i] for i in idx]
            return torch.cat([wlt.pair_logps(pi_w, exs, pad), wlt.pair_logps(pi_ref, exs, pad)], 1)
    out = torch.zeros(len(pairs), 4)
    with torch.inference_mode(), dist.autocast(dev):
        run(batches[-1][:2])  # warm-up (allocator, kernels), not timed
        with Peak(dev) as peak:
            sync(dev)
            t0 = time.perf_counter()
            for idx in batches:
                out[idx] = run(idx).float().cpu()
            sync(dev)
            seconds = time.perf_counter() - t0
        flops = count_flops(lambda: [run(idx) for idx in batches])
    return {"pairs_per_s": len(pairs) / seconds, "peak": peak.bytes, "flops_per_s": flops / seconds,
            "logps": out.tolist()}


def work_dpo(args, side: str, dev) -> dict:
    """args.dpo_steps LoRA-DPO steps of args.dpo_batch pairs: seconds per step, peak memory, first loss."""
    model = add_lora(build(args.model, args.seed), args.seed).to(dev)
    pairs = make_pairs(args.dpo_batch * (args.dpo_steps + 1), model.config.vocab_size, args.seed + 7)
    pad = model.config.pad_token_id
    batches = [pairs[s:s + args.dpo_batch] for s in range(0, len(pairs), args.dpo_batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    res = {}
    if side == "baseline":
        ref_model = build(args.model, args.seed).to(dev)  # the second model, in memory for the whole run

        def step_logps(exs):
            with torch.no_grad():
                ref = full_logits_logps(ref_model, exs, pad, dev)
            return full_logits_logps(model, exs, pad, dev), ref
    else:  # train_dpo.py: the reference once, before the loop (adapter off); then the policy alone
        sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), wlt.lora_disabled(model), dist.autocast(dev):
            refs = [wlt.pair_logps(model, exs, pad) for exs in batches]
        sync(dev)
        res["ref_seconds_per_step"] = (time.perf_counter() - t0) / len(batches)
        ref_of = {id(exs): r for exs, r in zip(batches, refs)}

        def step_logps(exs):
            return wlt.pair_logps(model, exs, pad), ref_of[id(exs)]

    def step(exs):
        with dist.autocast(dev):
            pol, ref = step_logps(exs)
        losses, _, _ = wlt.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], 0.1)
        loss = losses.mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), float(norm)

    res["first_loss"], res["first_grad_norm"] = step(batches[0])  # also the warm-up: optimizer state allocated
    times, peak = timed(step, batches[1:], dev)
    res["flops_per_s"] = count_flops(lambda: step(batches[1])) / (sum(times) / len(times))
    res.update(step_seconds=sorted(times)[len(times) // 2], peak=peak)
    return res


def work_sft(args, side: str, dev) -> dict:
    """Full fine-tuning SFT steps on prompt + chosen sequences: tokens/s (all tokens), peak, first loss."""
    model = build(args.model, args.seed).to(dev)
    pairs = make_pairs(args.sft_batch * (args.sft_steps + 1), model.config.vocab_size, args.seed + 11)
    pad = model.config.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = []
    for s in range(0, len(pairs), args.sft_batch):
        exs = pairs[s:s + args.sft_batch]
        batches.append({k: v.to(dev) for k, v in wlt.collate([(e["prompt_ids"], e["chosen_ids"]) for e in exs], pad).items()})

    def step(b):
        with dist.autocast(dev):
            if side == "baseline":  # mean token cross-entropy of the full logits, the usual causal-LM loss
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                       ignore_index=wlt.IGNORE)
            else:  # train_sft.py
                loss = wlt.sft_loss(wlt.response_logps(model, **b), int((b["labels"] != wlt.IGNORE).sum()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    first = step(batches[0])
    times, peak = timed(step, batches[1:], dev)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    return {"tokens_per_s": tokens / sum(times), "peak": peak, "first_loss": first,
            "flops_per_s": count_flops(lambda: step(batches[1])) / (sum(times) / len(times))}


WORK = {"label": work_label, "dpo": work_dpo, "sft": work_sft}


# ---------------------------------------------------------------------------------------------------------
# the parent: run every (task, side) in its own process, check, tabulate

def run_worker(argv: list[str], task: str, side: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker", task, "--side", side,
                            "--result", out], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"bench worker {task}/{side} failed:\n{p.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def check_same(task: str, a: dict, b: dict) -> str:
    """Both sides computed the same numbers (fp32 tolerances relative to the sums of log-probs)."""
    if task == "label":
        la, lb = torch.tensor(a["logps"], dtype=torch.float64), torch.tensor(b["logps"], dtype=torch.float64)
        diff = (la - lb).abs()
        bad = diff > 1e-5 * la.abs() + 1e-3
        if bad.any():
            raise SystemExit(f"labeling: log-probs differ (max {diff.max():.3g})")
        ra, rb = la[:, 0:2] - la[:, 2:4], lb[:, 0:2] - lb[:, 2:4]
        flips = int(((ra[:, 0] > ra[:, 1]) != (rb[:, 0] > rb[:, 1])).sum())
        near = int(((ra[:, 0] - ra[:, 1]).abs() < 1e-2).sum())
        if flips > near:
            raise SystemExit(f"labeling: {flips} labels differ")
        return f"log-probs max |diff| {diff.max():.2e} (sums ~{la.abs().mean():.0f}); labels identical on {len(la) - flips}/{len(la)}"
    if task == "dpo":
        for k in ("first_loss", "first_grad_norm"):
            if not math.isclose(a[k], b[k], rel_tol=1e-3, abs_tol=1e-5):
                raise SystemExit(f"dpo: {k} differs: {a[k]} vs {b[k]}")
        return f"first loss {a['first_loss']:.6f} vs {b['first_loss']:.6f}, grad norm {a['first_grad_norm']:.5g} vs {b['first_grad_norm']:.5g}"
    if not math.isclose(a["first_loss"], b["first_loss"], rel_tol=1e-5):
        raise SystemExit(f"sft: loss differs: {a['first_loss']} vs {b['first_loss']}")
    return f"first loss {a['first_loss']:.6f} vs {b['first_loss']:.6f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=list(SHAPES), help="model shape (random weights)")
    ap.add_argument("--pairs", type=int, default=48, help="pairs labeled by each side")
    ap.add_argument("--label-batch", type=int, default=16, help="pairs per labeling batch (both sides)")
    ap.add_argument("--dpo-batch", type=int, default=4, help="pairs per DPO step (both sides)")
    ap.add_argument("--dpo-steps", type=int, default=3, help="timed DPO steps (after one warm-up step)")
    ap.add_argument("--sft-batch", type=int, default=4, help="sequences per SFT step")
    ap.add_argument("--sft-steps", type=int, default=3, help="timed SFT steps (after one warm-up step)")
    ap.add_argument("--tasks", default="label,dpo,sft", help="comma-separated subset of label,dpo,sft")
    ap.add_argument("--seed", type=int, default=0, help="weights and token ids")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dev = dist.device()
    if args.worker:
        res = WORK[args.worker](args, args.side, dev)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return

    argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if args.json in argv:
        argv.remove(args.json)
    peak_flops = matmul_flops(dev)
    print(f"bench: model {args.model} (random weights), device {dev}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fp32 matmul {peak_flops / 1e9:.1f} GFLOP/s", flush=True)
    results, rows = {"matmul_flops_per_s": peak_flops, "args": vars(args)}, []
    for task in args.tasks.split(","):
        base = run_worker(argv, task, "baseline")
        mine = run_worker(argv, task, "wlt")
        note = check_same(task, base, mine)
        results[task] = {"baseline": {k: v for k, v in base.items() if k != "logps"},
                         "wlt": {k: v for k, v in mine.items() if k != "logps"}, "same_numbers": note}
        mb = 2 ** 20
        if task == "label":
            rows.append(("labeling pairs/s", base["pairs_per_s"], mine["pairs_per_s"], mine["pairs_per_s"] / base["pairs_per_s"]))
        elif task == "dpo":
            rows.append(("DPO step seconds", base["step_seconds"], mine["step_seconds"], base["step_seconds"] / mine["step_seconds"]))
            amort = mine["step_seconds"] + mine["ref_seconds_per_step"]
            rows.append(("DPO step + ref once (s)", base["step_seconds"], amort, base["step_seconds"] / amort))
        else:
            rows.append(("SFT tokens/s", base["tokens_per_s"], mine["tokens_per_s"], mine["tokens_per_s"] / base["tokens_per_s"]))
        rows.append((f"{task} peak MiB", base["peak"] / mb, mine["peak"] / mb, mine["peak"] / max(base["peak"], 1)))
        rows.append((f"{task} FLOP/s share", base["flops_per_s"] / peak_flops, mine["flops_per_s"] / peak_flops,
                     mine["flops_per_s"] / base["flops_per_s"]))
        print(f"  {task}: same numbers: {note}", flush=True)
    print("\n| measure | baseline | wlt | wlt / baseline |\n| --- | ---: | ---: | ---: |")
    for name, b, m, r in rows:
        print(f"| {name} | {b:.3g} | {m:.3g} | {r:.2f}x |")
    print("\n(speed rows: higher is better for wlt, seconds rows are baseline / wlt; peak MiB: wlt / baseline, lower is "
          "better; FLOP/s share: matmul FLOPs executed per second / the machine's fp32 matmul FLOP/s)")
    if args.json:
        files.write_json(args.json, results)


if __name__ == "__main__":
    main()
