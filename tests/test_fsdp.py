"""2 processes (torchrun, FSDP2 over gloo) == 1 process on the same global batch.

Each case trains the same tiny model on the same pairs twice: once with plain `python` and once under
`torchrun --nproc_per_node 2`, with different --micro-batch-size settings, and compares the per-step metrics
in metrics.jsonl and the saved weights. The loss reduction (docs/training.md): SFT = summed
response-token NLL over the global batch / its token count, DPO = mean over the pairs of the global batch,
so any number of ranks and any micro-batching gives the same step.

Why grad_norm is compared too: AdamW is almost invariant to a constant gradient scale (and clipping
normalises it anyway), so a wrong "x world size" or "/ micro-batches" factor would leave the weights nearly
unchanged; the logged pre-clipping gradient norm exposes it.

The launches are independent, so they run concurrently (a thread pool around conftest.run_script /
conftest.torchrun); each test waits only for its own case.
"""
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file

from conftest import ROOT, run_script, torchrun

SFT = os.path.join(ROOT, "train_sft.py")
DPO = os.path.join(ROOT, "train_dpo.py")

WORDS = ("the quick brown fox jumps over lazy dog bake bread at home mix flour water salt yeast then let it "
         "rise summaries should be short keep brief say what matters first sort numbers").split()


def write_pairs(path: str, n: int, seed: int, prompt_words: tuple = (2, 7)) -> str:
    """n short HH-style pairs (words from the BPE tokenizer's corpus, so real merges occur)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    rows = []
    for _ in range(n):
        chosen = " " + text(1, 6)
        rejected = " " + text(1, 6)
        if rejected == chosen:
            rejected += " no"
        rows.append({"prompt": f"Human: {text(*prompt_words)}? Assistant:", "chosen": chosen, "rejected": rejected})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


# name -> (script, family, pairs, extra flags, 1-proc micro, 2-proc micro (None: default = batch / 2)[, flags of
# the 2-process side only[, of the 1-process side only]]).
# Global batch 8 everywhere. Batch plans (eval slice = min(--eval-pairs, pairs // 10)):
#   21 train pairs -> batches 8, 8, 5; 27 train -> 8, 8, 8, 3. A final odd batch split over 2 ranks leaves
#   rank 1 a micro-batch short with micro 2 (5 = 3 + 2 items) and micro 1 (3 = 2 + 1): the weight-0 padding
#   of dist.micro_batches runs (checked in test_padding_path_is_exercised).
CASES = {
    # SFT full fine-tune, Llama: 1 proc no accumulation vs 2 procs x 4 micro-batches of 2 (+ padding)
    "sft-llama": (SFT, "llama", 21, ["--eval-pairs", "0", "--lr", "2e-3"], 8, 2),
    # SFT, OPT: accumulation on both sides (1 proc 3+3+2), held-out eval/loss every step through
    # dist.sharded_map with 3 items over 2 ranks (padded)
    "sft-opt": (SFT, "opt", 30, ["--eval-pairs", "3", "--eval-every", "1", "--lr", "2e-3"], 3, None),
    # DPO with LoRA rank 8 (default) on GPT-2 (Conv1D, tied head): 1 proc 3+3+2 vs 2 procs micro 1 (+ padding),
    # held-out DPO metrics every step
    "dpo-lora-gpt2": (DPO, "gpt2", 30, ["--eval-pairs", "3", "--eval-every", "1", "--lr", "1e-2"], 3, 1),
    # DPO full fine-tune, Llama: no accumulation on either side
    "dpo-full-llama": (DPO, "llama", 21, ["--eval-pairs", "0", "--lora-rank", "0", "--lr", "1e-3"], None, None),
    # activation checkpointing and packed rows on the 2-process side only (micro-batches of 4, so that short
    # sequences share rows: test_packed_case_shares_rows): the same steps as padded rows storing every activation
    "sft-llama-ac": (SFT, "llama", 21, ["--eval-pairs", "0", "--lr", "2e-3"], 8, 4,
                     ["--activation-checkpointing", "--pack", "on"], ["--pack", "off"]),
    # (both sides share the prompt: packed pairs under SDPA, recomputed as they are)
    "dpo-lora-opt-ac": (DPO, "opt", 21, ["--eval-pairs", "0", "--lr", "1e-2", "--share-prompt", "on"], 4, 2,
                        ["--activation-checkpointing"]),
}
SEED = 3
PROMPT_WORDS = {"sft-llama-ac": (1, 30)}  # prompts of very different lengths: short sequences share a packed row


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_model_dir):
    """name -> (future of 1-proc run, future of 2-proc run, model dir, out1, out2). Every launch starts at
    once; threads only wait on subprocesses, so the processes share the 2 cores."""
    base = tmp_path_factory.mktemp("fsdp")
    pool = ThreadPoolExecutor(max_workers=4)
    out = {}
    for name, (script, family, n, extra, m1, m2, *sides) in CASES.items():
        only2, only1 = (sides + [[], []])[:2]
        model = tiny_model_dir(family)
        data = write_pairs(str(base / f"{name}.jsonl"), n, seed=len(name), prompt_words=PROMPT_WORDS.get(name, (2, 7)))
        common = [script, "--model", model, "--data", data, "--seed", str(SEED), "--batch-size", "8",
                  "--epochs", "1", *extra]
        o1, o2 = str(base / name / "p1"), str(base / name / "p2")
        a1 = common + ["--out", o1] + (["--micro-batch-size", str(m1)] if m1 else []) + only1
        a2 = common + ["--out", o2] + (["--micro-batch-size", str(m2)] if m2 else []) + only2
        f2 = pool.submit(torchrun, 2, *a2)
        f1 = pool.submit(run_script, *a1, env={"OMP_NUM_THREADS": "1"})
        out[name] = (f1, f2, model, o1, o2)
    yield out
    pool.shutdown(wait=True)


def metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def close(a: float, b: float, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= abs_ + rel * max(abs(a), abs(b))


def assert_same_metrics(m1: list[dict], m2: list[dict], keys: list[str], abs_: float = 1e-6):
    assert len(m1) == len(m2) and len(m1) >= 3
    for r1, r2 in zip(m1, m2):
        assert r1["step"] == r2["step"]
        for k in keys:
            assert k in r1 and k in r2, (k, r1)
            assert close(r1[k], r2[k], abs_=abs_), f"step {r1['step']} {k}: 1 proc {r1[k]!r} vs 2 procs {r2[k]!r}"


def assert_same_tensors(path1: str, path2: str, atol: float = 1e-5) -> dict:
    t1, t2 = load_file(path1), load_file(path2)
    assert sorted(t1) == sorted(t2)
    for k in t1:
        assert t1[k].shape == t2[k].shape, k
        diff = (t1[k] - t2[k]).abs().max().item()
        assert diff <= atol, f"{os.path.basename(path1)} {k}: max |1 proc - 2 procs| = {diff:.3g}"
    return t1


def assert_moved(start_dir: str, trained: dict, min_change: float = 1e-3) -> set:
    """The trained weights differ from the start model (else the comparison proves nothing). Returns the
    names of the tensors that moved."""
    start = load_file(os.path.join(start_dir, "model.safetensors"))
    moved = {k for k in trained if k in start and (trained[k] - start[k]).abs().max().item() > min_change}
    assert moved, "training did not change any weight"
    return moved


def finished(launches, name):
    f1, f2, model, o1, o2 = launches[name]
    p2 = f2.result()
    f1.result()
    assert "2 process(es)" in p2.stdout + p2.stderr, "the torchrun run did not run distributed"
    return model, o1, o2


def test_padding_path_is_exercised(monkeypatch):
    """The case sizes above really give rank 1 a weight-0 padding micro-batch in the last global batch."""
    from lib import dist, trainer
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for n_train, micro in [(21, 2), (27, 1)]:
        last = trainer.batch_plan(n_train, 8, 1, SEED)[-1]
        assert len(last) % 2 == 1
        assert any(w == [0.0] for _, w in dist.micro_batches(last, micro)), (n_train, micro)


def test_packed_case_shares_rows(monkeypatch, tmp_path, tiny_model_dir):
    """The packed side of sft-llama-ac really lays two sequences in one row in some micro-batch (else it runs the
    padded batch, wlt.pair_logps, and the case would compare padded with padded)."""
    import wlt
    from lib import data, dist, models, trainer
    script, family, n, *_ = CASES["sft-llama-ac"]
    tok = models.load_tokenizer(tiny_model_dir(family))
    texts = data.read_pairs(write_pairs(str(tmp_path / "p.jsonl"), n, seed=len("sft-llama-ac"),
                                        prompt_words=PROMPT_WORDS["sft-llama-ac"]), data.Skips(), [])
    exs, _ = data.tokenize_pairs(tok, texts)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shared = 0
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        for batch in trainer.batch_plan(n, 8, 1, SEED):
            for idx, _ in dist.micro_batches(batch, 4):
                lengths = [len(exs[i]["prompt_ids"]) + len(exs[i]["chosen_ids"]) for i in idx]
                shared += len(wlt.pack_rows(lengths)) < len(idx)
    assert shared > 0


SFT_KEYS = ["loss", "grad_norm", "lr"]
DPO_KEYS = ["loss", "grad_norm", "lr", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "logps/chosen", "logps/rejected"]


@pytest.mark.parametrize("name", ["sft-llama", "sft-opt", "sft-llama-ac"])
def test_sft_two_processes_equal_one(launches, name):
    model, o1, o2 = finished(launches, name)
    m1, m2 = metrics(o1), metrics(o2)
    keys = SFT_KEYS + (["eval/loss"] if name == "sft-opt" else [])
    assert_same_metrics(m1, m2, keys)
    assert m1[-1]["loss"] < m1[0]["loss"]
    sd = assert_same_tensors(os.path.join(o1, "model.safetensors"), os.path.join(o2, "model.safetensors"))
    moved = assert_moved(model, sd, min_change=5e-4)
    assert len(moved) > len(sd) // 2  # a full fine-tune moves (nearly) every tensor


def test_dpo_lora_two_processes_equal_one(launches):
    model, o1, o2 = finished(launches, "dpo-lora-gpt2")
    m1, m2 = metrics(o1), metrics(o2)
    eval_keys = [f"eval/{k}" for k in ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                       "rewards/margins", "logps/chosen", "logps/rejected"]]
    assert_same_metrics(m1, m2, DPO_KEYS + eval_keys, abs_=1e-5)
    # step 1: pi == pi_ref and the reference ran on the same micro-batches, so the rewards are exactly 0
    # (ties: not accurate) in both runs; after that the accuracies must agree exactly
    for m in (m1, m2):
        assert abs(m[0]["loss"] - math.log(2)) < 1e-6
        assert m[0]["rewards/chosen"] == 0.0 and m[0]["rewards/rejected"] == 0.0
        assert m[0]["rewards/accuracies"] == 0.0
    assert [r["rewards/accuracies"] for r in m1] == pytest.approx([r["rewards/accuracies"] for r in m2], abs=1e-6)
    assert max(abs(r["rewards/margins"]) for r in m1[1:]) > 1e-3  # the policy moved away from the reference

    merged = assert_same_tensors(os.path.join(o1, "model.safetensors"), os.path.join(o2, "model.safetensors"))
    adapter = assert_same_tensors(os.path.join(o1, "adapter", "adapter_model.safetensors"),
                                  os.path.join(o2, "adapter", "adapter_model.safetensors"), atol=1e-5)
    assert adapter and all(k.startswith("base_model.model.") for k in adapter)
    assert max(v.abs().max().item() for k, v in adapter.items() if ".lora_B." in k) > 1e-3  # B left 0
    moved = assert_moved(model, merged)
    # LoRA changes the target layers only (GPT-2: c_attn, c_proj, c_fc weights); embeddings, norms, biases stay
    assert moved and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in moved), moved
    with open(os.path.join(o1, "adapter", "adapter_config.json")) as f1, \
            open(os.path.join(o2, "adapter", "adapter_config.json")) as f2:
        c1, c2 = json.load(f1), json.load(f2)
    assert c1 == c2 and c1["r"] == 8 and c1["fan_in_fan_out"] is True


def test_dpo_full_two_processes_equal_one(launches):
    model, o1, o2 = finished(launches, "dpo-full-llama")
    m1, m2 = metrics(o1), metrics(o2)
    assert_same_metrics(m1, m2, DPO_KEYS, abs_=1e-5)
    assert [r["rewards/accuracies"] for r in m1] == pytest.approx([r["rewards/accuracies"] for r in m2], abs=1e-6)
    assert not os.path.exists(os.path.join(o1, "adapter")) and not os.path.exists(os.path.join(o2, "adapter"))
    sd = assert_same_tensors(os.path.join(o1, "model.safetensors"), os.path.join(o2, "model.safetensors"))
    assert len(assert_moved(model, sd, min_change=5e-4)) > len(sd) // 2


def test_dpo_with_activation_checkpointing_equals_plain(launches):
    """2 FSDP processes with --activation-checkpointing (LoRA, OPT) == 1 process that stores every activation:
    the recomputation gives the same losses, gradient norms and weights."""
    model, o1, o2 = finished(launches, "dpo-lora-opt-ac")
    m1, m2 = metrics(o1), metrics(o2)
    assert_same_metrics(m1, m2, DPO_KEYS, abs_=1e-5)
    assert abs(m2[0]["loss"] - math.log(2)) < 1e-6
    cfg = json.load(open(os.path.join(o2, "train_config.json")))
    assert cfg["args"]["activation_checkpointing"] is True
    assert_same_tensors(os.path.join(o1, "adapter", "adapter_model.safetensors"),
                        os.path.join(o2, "adapter", "adapter_model.safetensors"), atol=1e-5)


@pytest.mark.parametrize("name", ["sft-llama", "dpo-full-llama"])
def test_two_processes_hold_half_the_parameters_and_optimizer(launches, name):
    """Per-rank parameter and AdamW-state memory of the 2-process FSDP2 run is about half the 1-process run's
    (counted from the local shards; rows of odd-sized tensors round up, so a little over half)."""
    _, o1, o2 = finished(launches, name)
    m1 = json.load(open(os.path.join(o1, "train_config.json")))["data"]["memory"]
    m2 = json.load(open(os.path.join(o2, "train_config.json")))["data"]["memory"]
    for k in ("params_mib_per_rank", "optimizer_mib_per_rank"):
        assert m1[k] > 0 and 0.45 <= m2[k] / m1[k] <= 0.56, (k, m1[k], m2[k])


def test_fsdp_precision_follows_the_dtype_flag():
    """bf16 parameters under FSDP2 exactly where the compute dtype is bf16: `--dtype fp32` on a GPU keeps fp32 (it
    once gave bf16 parameters whatever the flag said); the CPU is fp32 by default, and `--dtype bf16` there gets
    the GPU's policy (bf16 parameters, fp32 reduction), so the CPU tests run the path a GPU runs."""
    import torch
    from lib import dist
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")  # a device name: no GPU needed to build it
    assert dist.mixed_precision(cuda).param_dtype == torch.bfloat16
    assert dist.mixed_precision(cuda).reduce_dtype == torch.float32
    assert dist.mixed_precision(cuda, "bf16").param_dtype == torch.bfloat16
    assert dist.mixed_precision(cuda, "fp32").param_dtype is None  # None: the parameters' own dtype, fp32
    assert dist.mixed_precision(cpu).param_dtype is None
    assert dist.mixed_precision(cpu, "bf16").param_dtype == torch.bfloat16
    assert dist.mixed_precision(cpu, "bf16").reduce_dtype == torch.float32
