"""Speed and memory of wlt against a plain baseline and against TRL's DPOTrainer, measured in one run on this
machine (as in nanoGPT's bench.py: ratios, not absolute numbers, are what carries over between machines).

    python extras/bench.py                    SmolLM2-135M's shape (random weights), HH-like lengths
    python extras/bench.py --model DIR --pairs FILE
                                              a local pretrained model (weights and tokenizer) on real pairs,
                                              with TRL as a third side when trl and peft are importable
    python extras/bench.py --model opt-125m   OPT-125M's shape
    python extras/bench.py --model tiny       a seconds-long smoke run (what the tests use)
    python extras/bench.py --model llama-3.2-1b --prompt-tokens 96-128 --response-tokens 832-896
                                              a GPU-filling shape: Llama-3.2-1B's, 128,256-token vocabulary

The baseline is the common implementation: both models in memory, chosen and rejected as two full sequences
(prompt included, concatenated into one batch), full fp32 logits [2B, T, V], log_softmax of the same size,
gather; in DPO the reference runs inside every step; SFT takes the cross-entropy of the full logits.
wlt is the library's own path: wlt.pair_logps (prompt once per pair, shared by both responses;
only response positions projected onto the vocabulary, in chunks, recomputed in backward), length-bucketed
batches for labeling, the reference computed once before the DPO loop (timed apart: "ref once"), and
wlt.response_logps + wlt.sft_loss for SFT. Both sides start from the same random weights and the same token
ids, and the run stops with an error if they disagree: labeling log-probs and labels, the first DPO loss and
gradient norm, the SFT loss.

With `--pairs FILE` the pairs are real ones (any pair file the scripts read, e.g. raw HH-RLHF rows), tokenized
with the model's tokenizer (the project's convention), pairs longer than --max-len left out; with `--model DIR`
the weights are a local pretrained model's. TRL is then a third side, in its own process under --trl-python,
when that interpreter imports trl and peft (skipped with a one-line reason otherwise; never a dependency of the
scripts): its DPOTrainer as a user would run it, with a peft LoraConfig of the same rank, alpha and target
modules, beta 0.1, the same pairs in the same order (sequential sampler), the same pairs per step and max
length, no gradient checkpointing, fp32 on CPU (bf16 autocast on CUDA), the reference forward inside each step
(its default). TRL has no labeler: its nearest equivalent is the reference pass of precompute_ref_log_probs
(DPOTrainer.compute_ref_log_probs over its own padded batches), one model per pair; labeling needs two, so the
table compares wlt's labeling with half of that rate. TRL's reference log-probs are checked against wlt's
pi_ref log-probs of the same pairs (same weights, same tokens).

Each (task, side) runs in its own process. Peak memory is that process's peak minus its resident size after
the weights are loaded (on Linux the peak is reset through /proc/self/clear_refs; on CUDA,
torch.cuda.max_memory_allocated, which also gives the device's whole peak, weights included). "FLOP/s share"
is the matmul FLOPs the side executed (counted with torch.utils.flop_counter, padding included) per second,
over the matmul FLOP/s this machine reaches on a product of random matrices in the compute dtype (2048^3
on CPU, 8192^3 on CUDA), measured in the same run: fp32 on CPU, bf16 on CUDA (both sides run under bf16 autocast there, as the scripts do; --dtype fp32
turns it off). Under bf16 the two sides round differently, so their agreement is checked to bf16 tolerances
(BF16_TOL); in fp32 to fp32 tolerances. With --keep-going a disagreement, or a side that fails (out of
memory, say), is printed and the rest still runs (exit status 3) instead of stopping: for long runs whose
other figures should not be lost.
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
from lib import dist, files  # noqa: E402
from lib.data import in_batches  # noqa: E402

SHAPES = {  # the model shapes of the paper's teacher class (published configs), random weights
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "opt-125m": dict(model_type="opt", vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
                     do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, bos_token_id=2,
                     eos_token_id=2, pad_token_id=1),
    # Llama-3.2-1B (published config; rope scaling left out: random weights, positions under 1k)
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny": dict(model_type="llama", vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0),
}


# ---------------------------------------------------------------------------------------------------------
# the same inputs and weights on both sides

def make_pairs(n: int, vocab: int, seed: int, prompt=(90, 160), response=(20, 70)) -> list[dict]:
    """n tokenized pairs, lengths uniform in the ranges (default HH-RLHF-like: prompt ~125 tokens, responses
    ~45; each response + EOS)."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
    return [{"prompt_ids": ids(*prompt), "chosen_ids": ids(*response) + [2], "rejected_ids": ids(*response) + [2]}
            for _ in range(n)]


def build(shape: str, seed: int, noise: float = 0.0, dev=None):
    """A causal LM of the named shape with seeded random weights, or a local model folder's weights (+ seeded
    noise: a 'trained' copy), built on `dev` (default CPU): a GPU draws a billion random weights in a moment, a
    CPU in tens of seconds. Both sides of a comparison build on the same device, so they hold the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    dev = torch.device(dev or "cpu")
    if shape not in SHAPES:  # a local model folder (main() checked it)
        model = AutoModelForCausalLM.from_pretrained(shape, dtype=torch.float32).to(dev)
    else:
        cfg = dict(SHAPES[shape])
        kind = cfg.pop("model_type")
        torch.manual_seed(seed)
        with dev:
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **cfg), dtype=torch.float32)
    if noise:
        g = torch.Generator(device=dev).manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std().clamp(min=1e-3) * torch.randn(p.shape, generator=g, device=dev))
    return model.eval()


def lora_targets(args, model) -> list[str]:
    """--lora-targets, else wlt's default for the model's family: the same modules on every side."""
    if args.lora_targets:
        return args.lora_targets.split(",")
    return wlt.LORA_TARGETS[model.config.model_type]


def add_lora(model, seed: int, targets: list[str]):
    """LoRA rank 8 (paper) with a non-zero B, so the policy differs from its reference at step 1."""
    torch.manual_seed(seed)
    wlt.add_lora(model, 8, 16.0, targets=targets)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for m in wlt.lora_modules(model):  # drawn on the CPU whatever the model's device: the same B everywhere
            m.lora_B.weight.copy_(0.01 * torch.randn(m.lora_B.weight.shape, generator=g))
    return model


def tokenizer_path(args) -> str | None:
    return args.tokenizer or (args.model if args.model not in SHAPES else None)


def bench_pairs(args, n: int, seed_offset: int, vocab: int) -> list[dict]:
    """n tokenized pairs: the first n usable pairs of --pairs FILE (each with its texts under "text"), else
    synthetic ones of the --prompt-tokens/--response-tokens lengths."""
    if args.pairs is None:
        return make_pairs(n, vocab, args.seed + seed_offset, args.prompt_tokens, args.response_tokens)
    from lib.data import Skips, read_pairs, tokenize_pairs, usable_pairs
    from lib.models import load_tokenizer
    tok = load_tokenizer(tokenizer_path(args))
    skips, locs = Skips(), []
    texts = read_pairs(args.pairs, skips, locs)
    exs, _ = tokenize_pairs(tok, texts)
    keep = usable_pairs(exs, locs, args.max_len, skips, too_long="drop")  # whole pairs: TRL sees the same tokens
    if len(keep) < n:
        raise SystemExit(f"{args.pairs}: {len(keep)} pairs fit --max-len {args.max_len}, {n} needed; lower "
                         f"--num-pairs (labeling) or --dpo-batch x (--dpo-steps + 1) (DPO)")
    top = max(max(max(e[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")) for e in exs)
    if top >= vocab:
        raise SystemExit(f"{args.pairs}: token id {top} from tokenizer {tokenizer_path(args)} is outside the "
                         f"model's vocabulary ({vocab}); use the model's own tokenizer")
    return [dict(exs[i], text=texts[i]) for i in keep[:n]]


def pad_of(model) -> int:
    cfg = model.config
    return next(t for t in (cfg.pad_token_id, cfg.eos_token_id, 0) if t is not None)


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
            self.total = torch.cuda.max_memory_allocated()  # everything on the device, weights included
            self.bytes = self.total - self.base
        else:
            self.total = _status("VmHWM")  # the process's, libraries included
            self.bytes = self.total - self.base


def timed(step, items: list, dev) -> tuple[list[float], "Peak"]:
    """Run step(item) for each item: (seconds of each, the Peak: bytes above the start, total)."""
    times = []
    with Peak(dev) as peak:
        for item in items:
            sync(dev)
            t0 = time.perf_counter()
            step(item)
            sync(dev)
            times.append(time.perf_counter() - t0)
    return times, peak


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(dev, dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """The best FLOP/s of an n^3 product of random matrices in `dtype` (the bf16 rate where autocast runs)."""
    n = 8192 if dev.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
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
    """Label args.num_pairs pairs with pi_w and pi_ref: [N, 4] log-probs, pairs/s, peak memory."""
    pi_ref = build(args.model, args.seed, dev=dev)
    pi_w = build(args.model, args.seed, noise=0.02, dev=dev)
    pairs = bench_pairs(args, args.num_pairs, 0, pi_ref.config.vocab_size)
    pad = pad_of(pi_ref)
    if side == "baseline":
        batches = [list(range(s, min(s + args.label_batch, len(pairs)))) for s in range(0, len(pairs), args.label_batch)]

        def run(idx):
            exs = [pairs[i] for i in idx]
            return torch.cat([full_logits_logps(pi_w, exs, pad, dev), full_logits_logps(pi_ref, exs, pad, dev)], 1)
    else:  # label.py: length-bucketed batches, prompt shared, lean head
        lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
        batches = in_batches(lengths, args.label_batch)

        def run(idx):
            exs = [pairs[i] for i in idx]
            return torch.cat([wlt.pair_logps(pi_w, exs, pad), wlt.pair_logps(pi_ref, exs, pad)], 1)
    out = torch.zeros(len(pairs), 4)
    with torch.inference_mode(), dist.autocast(dev, args.dtype):
        run(batches[-1][:2])  # warm-up (allocator, kernels), not timed
        with Peak(dev) as peak:
            sync(dev)
            t0 = time.perf_counter()
            for idx in batches:
                out[idx] = run(idx).float().cpu()
            sync(dev)
            seconds = time.perf_counter() - t0
        flops = count_flops(lambda: [run(idx) for idx in batches])
    return {"pairs_per_s": len(pairs) / seconds, "peak": peak.bytes, "peak_total": peak.total, "flops_per_s": flops / seconds,
            "logps": out.tolist()}


def work_dpo(args, side: str, dev) -> dict:
    """args.dpo_steps LoRA-DPO steps of args.dpo_batch pairs: seconds per step, peak memory, first loss."""
    model = build(args.model, args.seed, dev=dev)
    model = add_lora(model, args.seed, lora_targets(args, model)).to(dev)
    pairs = bench_pairs(args, args.dpo_batch * (args.dpo_steps + 1), 7, model.config.vocab_size)
    pad = pad_of(model)
    batches = [pairs[s:s + args.dpo_batch] for s in range(0, len(pairs), args.dpo_batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    res = {}
    if side == "baseline":
        ref_model = build(args.model, args.seed, dev=dev)  # the second model, in memory for the whole run

        def step_logps(exs):
            with torch.no_grad():
                ref = full_logits_logps(ref_model, exs, pad, dev)
            return full_logits_logps(model, exs, pad, dev), ref
    else:  # train_dpo.py: the reference once, before the loop (adapter off); then the policy alone
        with torch.no_grad(), wlt.lora_disabled(model), dist.autocast(dev, args.dtype):
            wlt.pair_logps(model, batches[-1][:2], pad)  # warm-up (allocator, kernels), not timed, as in labeling
        sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), wlt.lora_disabled(model), dist.autocast(dev, args.dtype):
            refs = [wlt.pair_logps(model, exs, pad) for exs in batches]
        sync(dev)
        res["ref_seconds_per_step"] = (time.perf_counter() - t0) / len(batches)
        ref_of = {id(exs): r for exs, r in zip(batches, refs)}

        def step_logps(exs):
            return wlt.pair_logps(model, exs, pad), ref_of[id(exs)]

    def step(exs):
        with dist.autocast(dev, args.dtype):
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
    res.update(step_seconds=sorted(times)[len(times) // 2], peak=peak.bytes, peak_total=peak.total)
    return res


def work_sft(args, side: str, dev) -> dict:
    """Full fine-tuning SFT steps on prompt + chosen sequences: tokens/s (all tokens), peak, first loss."""
    model = build(args.model, args.seed, dev=dev)
    pairs = bench_pairs(args, args.sft_batch * (args.sft_steps + 1), 11, model.config.vocab_size)
    pad = pad_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = []
    for s in range(0, len(pairs), args.sft_batch):
        exs = pairs[s:s + args.sft_batch]
        b = {k: v.to(dev) for k, v in wlt.collate([(e["prompt_ids"], e["chosen_ids"]) for e in exs], pad).items()}
        batches.append(dict(b, pairs=exs))

    def step(b):
        with dist.autocast(dev, args.dtype):
            if side == "baseline":  # mean token cross-entropy of the full logits, the usual causal-LM loss
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                       ignore_index=wlt.IGNORE)
            else:  # train_sft.py: the sequences packed into rows (--pack auto)
                logps = wlt.pair_logps(model, b["pairs"], pad, responses=("chosen_ids",))[:, 0]
                loss = wlt.sft_loss(logps, int((b["labels"] != wlt.IGNORE).sum()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    first = step(batches[0])
    times, peak = timed(step, batches[1:], dev)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    return {"tokens_per_s": tokens / sum(times), "peak": peak.bytes, "peak_total": peak.total, "first_loss": first,
            "flops_per_s": count_flops(lambda: step(batches[1])) / (sum(times) / len(times))}


# ---------------------------------------------------------------------------------------------------------
# TRL's side (run under --trl-python; imports trl, peft and datasets only here)

def trl_trainer(args, model, pairs: list[dict], dev, batch: int, steps: int, callbacks=()):
    """TRL 1.x's DPOTrainer on the pairs' texts, as a user would set it up: a peft LoraConfig (rank 8, alpha 16,
    the same target modules as wlt), beta 0.1, `batch` pairs a step in the file's order, --max-len, no
    gradient checkpointing, fp32 (bf16 autocast on CUDA, as wlt), the reference forward inside each step."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lib.models import load_tokenizer
    tok = load_tokenizer(tokenizer_path(args))
    data = Dataset.from_list([{k: p["text"][k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    bf16 = dist.compute_dtype(dev, args.dtype) == torch.bfloat16
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), beta=0.1, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant",
                    max_length=args.max_len, gradient_checkpointing=False, bf16=bf16, use_cpu=dev.type == "cpu",
                    train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
                    seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets(args, model), task_type="CAUSAL_LM")
    return DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora,
                      callbacks=list(callbacks))


def work_label_trl(args, dev) -> dict:
    """TRL's reference pass (what precompute_ref_log_probs runs): one model's log-probs of each pair, in
    --label-batch pairs a batch of its own padding, in the file's order."""
    pairs = bench_pairs(args, args.num_pairs, 0, build_config(args).vocab_size)
    trainer = trl_trainer(args, build(args.model, args.seed, dev=dev), pairs, dev, args.label_batch, 1)
    batches = list(trainer.get_train_dataloader())
    out = []
    trainer.compute_ref_log_probs(trainer.model, trainer.data_collator([trainer.train_dataset[0]]))  # warm-up
    with Peak(dev) as peak:
        sync(dev)
        t0 = time.perf_counter()
        for b in batches:
            out.append(torch.stack(trainer.compute_ref_log_probs(trainer.model, b), dim=-1).float().cpu())
        sync(dev)
        seconds = time.perf_counter() - t0
    return {"ref_pairs_per_s": len(pairs) / seconds, "pairs_per_s": len(pairs) / seconds / 2, "peak": peak.bytes,
            "peak_total": peak.total, "ref_logps": torch.cat(out).tolist()}


def step_timer(dev):
    """A TrainerCallback that times each optimizer step (its reference forward included) and measures the peak
    from the second step on (the first allocates the optimizer state: wlt's side warms up the same way)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.peak, self.t0 = [], Peak(dev), 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                self.peak.__enter__()
            sync(dev)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(dev)
            self.times.append(time.perf_counter() - self.t0)
    return StepTimer()


def work_dpo_trl(args, dev) -> dict:
    pairs = bench_pairs(args, args.dpo_batch * (args.dpo_steps + 1), 7, build_config(args).vocab_size)
    timer = step_timer(dev)
    trainer = trl_trainer(args, build(args.model, args.seed, dev=dev), pairs, dev, args.dpo_batch,
                          args.dpo_steps + 1, [timer])
    trainer.train()
    timer.peak.__exit__(None, None, None)
    times = timer.times[1:]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"step_seconds": sorted(times)[len(times) // 2], "ref_seconds_per_step": 0.0, "peak": timer.peak.bytes,
            "peak_total": timer.peak.total, "first_loss": losses[0] if losses else None}


def work_sft_trl(args, dev) -> dict:
    """TRL 1.x's SFTTrainer on the same prompt -> chosen pairs and batches as wlt's SFT side, as a user would set it
    up: prompt-completion rows (loss on the completion only), no packing, no gradient checkpointing, a full
    fine-tune, fp32 (bf16 autocast on CUDA), --max-len, the file's order. Tokens/s counts the same tokens as wlt's
    side (TRL tokenizes prompt + completion jointly and appends EOS, as wlt does)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lib.models import load_tokenizer
    pairs = bench_pairs(args, args.sft_batch * (args.sft_steps + 1), 11, build_config(args).vocab_size)
    tok = load_tokenizer(tokenizer_path(args))
    data = Dataset.from_list([{"prompt": p["text"]["prompt"], "completion": p["text"]["chosen"]} for p in pairs])
    bf16 = dist.compute_dtype(dev, args.dtype) == torch.bfloat16
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=args.sft_batch,
                    gradient_accumulation_steps=1, max_steps=args.sft_steps + 1, learning_rate=1e-5,
                    lr_scheduler_type="constant", max_length=args.max_len, completion_only_loss=True, packing=False,
                    gradient_checkpointing=False, bf16=bf16, use_cpu=dev.type == "cpu",
                    train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
                    seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)
    timer = step_timer(dev)
    trainer = SFTTrainer(model=build(args.model, args.seed, dev=dev), args=cfg, train_dataset=data, processing_class=tok,
                         callbacks=[timer])
    trainer.train()
    timer.peak.__exit__(None, None, None)
    tokens = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in pairs[args.sft_batch:])
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"tokens_per_s": tokens / sum(timer.times[1:]), "peak": timer.peak.bytes, "peak_total": timer.peak.total,
            "first_loss": losses[0] if losses else None}


def build_config(args):
    """The model's config without its weights (the vocabulary size, for the pairs' check)."""
    from transformers import AutoConfig
    if args.model in SHAPES:
        cfg = dict(SHAPES[args.model])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoConfig.from_pretrained(args.model)


WORK = {"label": work_label, "dpo": work_dpo, "sft": work_sft}
WORK_TRL = {"label": work_label_trl, "dpo": work_dpo_trl, "sft": work_sft_trl}


# ---------------------------------------------------------------------------------------------------------
# the parent: run every (task, side) in its own process, check, tabulate

def run_worker(argv: list[str], task: str, side: str, python: str = sys.executable) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        p = subprocess.run([python, os.path.abspath(__file__), *argv, "--worker", task, "--side", side,
                            "--result", out], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"bench worker {task}/{side} failed:\n{p.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


# How far the two sides may be apart. fp32: rounding only. bf16 (autocast on CUDA): the two sides round their
# matmuls to 8 significant bits in different groupings (prompt shared or not, other padding). On the tiny
# shape under the CPU's bf16 autocast they differed by 3e-6 of a sum of log-probs, 2e-4 of the first DPO loss
# and 2e-3 of its gradient norm; the bf16 tolerances leave a deeper model's rounding room above that (300x,
# 100x, 10x). The fp32 run is the exact check.
FP32_TOL = {"logps_rel": 1e-5, "logps_abs": 1e-3, "margin": 1e-2, "dpo_rel": 1e-3, "dpo_abs": 1e-5, "sft_rel": 1e-5}
BF16_TOL = {"logps_rel": 2 ** -10, "logps_abs": 0.05, "margin": None, "dpo_rel": 0.02, "dpo_abs": 0.005,
            "sft_rel": 2 ** -10}


def check_same(task: str, a: dict, b: dict, tol: dict = FP32_TOL) -> str:
    """Both sides computed the same numbers, to the tolerances `tol` (relative to the sums of log-probs).
    Stops the run (SystemExit) when they do not."""
    if task == "label":
        la, lb = torch.tensor(a["logps"], dtype=torch.float64), torch.tensor(b["logps"], dtype=torch.float64)
        diff = (la - lb).abs()
        allowed = tol["logps_rel"] * la.abs() + tol["logps_abs"]
        if (diff > allowed).any():
            raise SystemExit(f"labeling: log-probs differ (max {diff.max():.3g})")
        ra, rb = la[:, 0:2] - la[:, 2:4], lb[:, 0:2] - lb[:, 2:4]
        flips = int(((ra[:, 0] > ra[:, 1]) != (rb[:, 0] > rb[:, 1])).sum())
        # a label may flip only where the reward margin is within what the log-probs may move
        margin = tol["margin"] if tol["margin"] is not None else 4 * allowed.max()
        near = int(((ra[:, 0] - ra[:, 1]).abs() < margin).sum())
        if flips > near:
            raise SystemExit(f"labeling: {flips} labels differ")
        return f"log-probs max |diff| {diff.max():.2e} (sums ~{la.abs().mean():.0f}); labels identical on {len(la) - flips}/{len(la)}"
    if task == "dpo":
        for k in ("first_loss", "first_grad_norm"):
            if not math.isclose(a[k], b[k], rel_tol=tol["dpo_rel"], abs_tol=tol["dpo_abs"]):
                raise SystemExit(f"dpo: {k} differs: {a[k]} vs {b[k]}")
        return f"first loss {a['first_loss']:.6f} vs {b['first_loss']:.6f}, grad norm {a['first_grad_norm']:.5g} vs {b['first_grad_norm']:.5g}"
    if not math.isclose(a["first_loss"], b["first_loss"], rel_tol=tol["sft_rel"]):
        raise SystemExit(f"sft: loss differs: {a['first_loss']} vs {b['first_loss']}")
    return f"first loss {a['first_loss']:.6f} vs {b['first_loss']:.6f}"


def token_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO-HI, e.g. 90-160") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= LO <= HI")
    return lo, hi


def trl_unavailable(args, python: str) -> str | None:
    """Why TRL's side cannot run (one line), or None."""
    if args.pairs is None:
        return "TRL tokenizes text: give a pair file with --pairs FILE"
    try:
        p = subprocess.run([python, "-c", "import trl, peft, datasets"], capture_output=True, text=True)
    except OSError:  # no such interpreter
        p = None
    if p is None or p.returncode != 0:
        return f"{python} cannot import trl, peft and datasets (pip install trl peft, or --trl-python PY)"
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help=f"model shape with random weights ({', '.join(SHAPES)}), or a local model folder")
    ap.add_argument("--pairs", default=None, metavar="FILE",
                    help="real pairs (any pair file the scripts read) instead of synthetic token ids; tokenized with "
                         "--tokenizer, pairs over --max-len left out; needed for TRL's side")
    ap.add_argument("--tokenizer", default=None, help="tokenizer of --pairs FILE (default: the --model folder's)")
    ap.add_argument("--max-len", type=int, default=512, help="with --pairs FILE: the longest pair kept (prompt + longer response)")
    ap.add_argument("--num-pairs", type=int, default=48, help="pairs labeled by each side")
    ap.add_argument("--label-batch", type=int, default=16, help="pairs per labeling batch (every side)")
    ap.add_argument("--dpo-batch", type=int, default=4, help="pairs per DPO step (every side)")
    ap.add_argument("--dpo-steps", type=int, default=3, help="timed DPO steps (after one warm-up step)")
    ap.add_argument("--lora-targets", default=None,
                    help="comma-separated LoRA target modules of every side (default: wlt.LORA_TARGETS of the family)")
    ap.add_argument("--sft-batch", type=int, default=4, help="sequences per SFT step")
    ap.add_argument("--sft-steps", type=int, default=3, help="timed SFT steps (after one warm-up step)")
    ap.add_argument("--tasks", default="label,dpo,sft", help="comma-separated subset of label,dpo,sft")
    ap.add_argument("--prompt-tokens", type=token_range, default=(90, 160), metavar="LO-HI",
                    help="synthetic prompt lengths, uniform in LO..HI tokens")
    ap.add_argument("--response-tokens", type=token_range, default=(20, 70), metavar="LO-HI",
                    help="synthetic response lengths, uniform in LO..HI tokens (+ EOS)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="compute dtype of every side: auto = bf16 autocast on CUDA, fp32 on CPU (as the scripts)")
    ap.add_argument("--trl-python", default=sys.executable,
                    help="python interpreter of TRL's side (one with trl and peft installed)")
    ap.add_argument("--seed", type=int, default=0, help="weights and token ids")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--keep-going", action="store_true",
                    help="when two sides disagree or one fails, say so and go on (exit status 3) instead of stopping")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap


def check_args(ap, args) -> None:
    """Every input checked before any side runs."""
    if args.model not in SHAPES and not os.path.isfile(os.path.join(args.model, "config.json")):
        ap.error(f"--model {args.model}: neither a shape ({', '.join(SHAPES)}) nor a model folder (no config.json)")
    if args.pairs is not None:
        if not os.path.exists(args.pairs):
            ap.error(f"--pairs {args.pairs}: no such file")
        if tokenizer_path(args) is None:
            ap.error("--pairs FILE with a random-weight shape needs --tokenizer (or --model a model folder)")
    for flag in ("num_pairs", "label_batch", "dpo_batch", "dpo_steps", "sft_batch", "sft_steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    bad = set(args.tasks.split(",")) - set(WORK)
    if bad:
        ap.error(f"--tasks: unknown {', '.join(sorted(bad))} (choose from label,dpo,sft)")


def run_sides(args, argv: list[str], task: str, trl_python: str | None) -> dict:
    """Every side of one task, each in its own process: {side: result or {"error": line}}."""
    sides = {}
    for side in ("baseline", "trl", "wlt"):
        if side == "trl" and (trl_python is None or task not in WORK_TRL):
            continue
        try:
            sides[side] = run_worker(argv, task, side, trl_python if side == "trl" else sys.executable)
        except SystemExit as e:  # e.g. out of device memory: with --keep-going, the other sides still run
            if not args.keep_going:
                raise
            last = [x for x in str(e).splitlines() if x.strip()][-1:] or ["no output"]
            sides[side] = {"error": last[0][:300]}
            print(f"  {task}/{side}: FAILED: {last[0][:300]}", flush=True)
    return sides


def check_trl(task: str, trl: dict, mine: dict, tol: dict) -> str:
    """TRL's reference log-probs against wlt's pi_ref log-probs of the same pairs (labeling), or TRL's first DPO
    loss (a fresh adapter: the policy is the reference, the loss log 2)."""
    if task == "label":
        a = torch.tensor(trl["ref_logps"], dtype=torch.float64)
        b = torch.tensor(mine["logps"], dtype=torch.float64)[:, 2:4]
        diff = (a - b).abs()
        if (diff > tol["logps_rel"] * b.abs() + tol["logps_abs"]).any():
            raise SystemExit(f"labeling: TRL's reference log-probs differ from wlt's (max {diff.max():.3g})")
        return f"TRL's reference log-probs vs wlt's: max |diff| {diff.max():.2e}"
    loss = trl.get("first_loss")
    if task == "sft":  # the same tokens and the token-mean loss: the first steps' losses agree
        if loss is None or not math.isclose(loss, mine["first_loss"], rel_tol=tol["sft_rel"], abs_tol=1e-4):
            raise SystemExit(f"sft: TRL's first loss {loss} differs from wlt's {mine['first_loss']}")
        return f"TRL's first loss {loss:.4f} vs wlt's {mine['first_loss']:.4f}"
    if loss is None or abs(loss - math.log(2)) > 1e-3:
        raise SystemExit(f"dpo: TRL's first loss {loss} is not log 2 (its adapter starts as the reference)")
    return f"TRL's first loss {loss:.4f} (log 2)"


def table_rows(task: str, sides: dict, peak_flops: float, dpo_batch: int) -> list[tuple]:
    """(measure, plain, TRL or None, wlt, higher_is_better) rows of one task."""
    base, trl, mine = sides["baseline"], sides.get("trl"), sides["wlt"]
    mb, rows = 2 ** 20, []
    if task == "label":
        rows.append(("labeling pairs/s", base["pairs_per_s"], trl and trl["pairs_per_s"], mine["pairs_per_s"], True))
    elif task == "dpo":
        rows.append(("DPO step seconds", base["step_seconds"], trl and trl["step_seconds"], mine["step_seconds"], False))
        amort = mine["step_seconds"] + mine["ref_seconds_per_step"]
        rows.append(("DPO step + ref once (s)", base["step_seconds"], trl and trl["step_seconds"], amort, False))
        rows.append(("DPO pairs/s, reference included", dpo_batch / base["step_seconds"],
                     trl and dpo_batch / trl["step_seconds"], dpo_batch / amort, True))
    else:
        rows.append(("SFT tokens/s", base["tokens_per_s"], trl and trl["tokens_per_s"], mine["tokens_per_s"], True))
    rows.append((f"{task} peak MiB", base["peak"] / mb, trl and trl["peak"] / mb, mine["peak"] / mb, False))
    # the process's whole peak too: on a CPU the allocator keeps what a warm-up freed, which hides the rise above it
    rows.append((f"{task} peak MiB, weights included", base["peak_total"] / mb, trl and trl["peak_total"] / mb,
                 mine["peak_total"] / mb, False))
    rows.append((f"{task} FLOP/s share", base["flops_per_s"] / peak_flops, None, mine["flops_per_s"] / peak_flops, True))
    return rows


def ratio(other, mine, higher_is_better: bool, memory: bool) -> str:
    """wlt against another side: speed as 'how many times faster', memory as wlt / other (lower is better)."""
    if other is None:
        return "-"
    r = mine / max(other, 1e-12) if (higher_is_better or memory) else other / mine
    return f"{r:.2f}x"


def print_table(rows: list[tuple], dname: str, trl_note: str) -> None:
    print("\n| measure | plain | TRL | wlt | wlt vs TRL | wlt vs plain |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, b, t, m, hib in rows:
        memory = "MiB" in name
        shown = "-" if t is None else f"{t:.3g}"
        print(f"| {name} | {b:.3g} | {shown} | {m:.3g} | {ratio(t, m, hib, memory)} | {ratio(b, m, hib, memory)} |")
    print("\n(ratios: speed rows, how many times faster wlt is; peak MiB, wlt / the other side, lower is better; "
          f"FLOP/s share: matmul FLOPs executed per second / the machine's {dname} matmul FLOP/s. TRL's labeling "
          "pairs/s is half its one-model reference pass; its DPO step includes its reference forward)")
    print(trl_note)


def main():
    ap = build_parser()
    args = ap.parse_args()
    dev = dist.device()
    if args.worker:
        work = WORK_TRL[args.worker] if args.side == "trl" else None
        res = work(args, dev) if work else WORK[args.worker](args, args.side, dev)
        res["threads"] = torch.get_num_threads()  # as the side ran (a library may change it)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return
    check_args(ap, args)

    argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if args.json in argv:
        argv.remove(args.json)
    cdt = dist.compute_dtype(dev, args.dtype)
    dname = "bf16" if cdt == torch.bfloat16 else "fp32"
    peak_flops = matmul_flops(dev, cdt)
    gpu = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    weights = "random weights" if args.model in SHAPES else "pretrained weights"
    data = f"pairs of {args.pairs}" if args.pairs else "synthetic token ids"
    print(f"bench: model {args.model} ({weights}), {data}, device {dev}{gpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {dname} matmul {peak_flops / 1e9:.1f} GFLOP/s", flush=True)
    why_not = trl_unavailable(args, args.trl_python)
    trl_note = f"TRL side skipped: {why_not}" if why_not else f"TRL side: {args.trl_python}"
    print(trl_note, flush=True)
    disagree = False
    results, rows = {"matmul_flops_per_s": peak_flops, "dtype": dname, "device": str(dev) + gpu,
                     "torch": torch.__version__, "args": vars(args), "trl": trl_note}, []
    for task in args.tasks.split(","):
        sides = run_sides(args, argv, task, None if why_not else args.trl_python)
        if any("error" in r for r in sides.values()):
            results[task] = {**sides, "same_numbers": "DIFFER: a side failed"}
            disagree = True
            continue
        tol = BF16_TOL if dname == "bf16" else FP32_TOL
        notes = []
        for check, other in ((check_same, "baseline"), (check_trl, "trl")):
            if other not in sides:
                continue
            try:
                notes.append(check(task, sides[other], sides["wlt"], tol))
            except SystemExit as e:
                if not args.keep_going:
                    raise
                notes.append(f"DIFFER: {e}")
                disagree = True
        note = "; ".join(notes)
        results[task] = {side: {k: v for k, v in r.items() if k not in ("logps", "ref_logps")} for side, r in sides.items()}
        results[task]["same_numbers"] = note
        rows += table_rows(task, sides, peak_flops, args.dpo_batch)
        print(f"  {task}: same numbers: {note}", flush=True)
    print_table(rows, dname, trl_note)
    if args.json:
        files.write_json(args.json, results)
    if disagree:
        sys.exit(3)

if __name__ == "__main__":
    main()
