"""What a CUDA machine with several GPUs or nodes would show, checked on the CPU: gloo processes with a short
timeout and a slow rank 0, ranks that see different files, FSDP2's bf16 policy, the reference cache met on
another device, autocast in the kernel's backward, sums that CUDA would make nondeterministic, the packed mask's
memory, the --ref model freed after the reference pass. docs/scaling.md says what only a GPU can confirm."""
import json
import os
import weakref

import pytest
import torch

from conftest import ROOT, run_script, torchrun
from test_fsdp import write_pairs

SFT = os.path.join(ROOT, "train_sft.py")
DPO = os.path.join(ROOT, "train_dpo.py")
INJECT = os.path.join(ROOT, "tests", "inject.py")


def rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------
# 2. NCCL's 10-minute default against rank 0's lone work: --dist-timeout

def test_a_slow_rank_0_within_dist_timeout_and_beyond(tmp_path, tiny_model_dir):
    """Rank 0 alone reads the model (here 8 s slower, injected from outside) while rank 1 waits in the broadcast.
    Beyond --dist-timeout (3 s) rank 1 stops with one line naming the flag; within it (the default) the run
    finishes."""
    data = write_pairs(str(tmp_path / "pairs.jsonl"), 12, seed=1)
    common = [INJECT, "slow:8@0", SFT, "--model", tiny_model_dir("llama"), "--data", data, "--max-steps", "1",
              "--eval-pairs", "0", "--batch-size", "4"]
    p = torchrun(2, *common, "--out", str(tmp_path / "short"), "--dist-timeout", "0.05", check=False)
    assert p.returncode != 0
    said = [line for line in p.stderr.splitlines() if line.startswith("error: rank 1: waited longer than")]
    assert said and "--dist-timeout 0.05 min" in said[0] and "raise --dist-timeout" in said[0], p.stderr[-2000:]
    torchrun(2, *common, "--out", str(tmp_path / "default"))
    assert os.path.isfile(tmp_path / "default" / "train_config.json")


# ----------------------------------------------------------------------------------------------------------
# 3. Ranks that see different files: rank 0 decides, and tells the others

def test_ranks_that_see_different_files_still_agree(tmp_path, tiny_model_dir):
    """A 2-process LoRA-DPO run killed after its checkpoint of step 2 is resumed while rank 1 sees the data file
    with another modification time (a node with its own copy: its fingerprints differ from rank 0's). Every
    decision taken from files is rank 0's: both ranks resume from the checkpoint and reuse the reference cache,
    instead of hanging or mixing states, and every step is written once. Rerun when finished, with rank 1's view
    still skewed, both ranks do nothing."""
    data = write_pairs(str(tmp_path / "pairs.jsonl"), 20, seed=2)
    out = str(tmp_path / "dpo")
    argv = [DPO, "--model", tiny_model_dir("llama"), "--data", data, "--out", out, "--batch-size", "4",
            "--max-steps", "4", "--save-every", "2", "--eval-pairs", "0", "--lr", "1e-2", "--resume",
            "--dist-timeout", "0.5"]
    p = torchrun(2, INJECT, "step:3@0", *argv, check=False)
    assert p.returncode != 0 and os.path.isfile(os.path.join(out, "checkpoint", "state.pt"))
    p = torchrun(2, INJECT, f"skew:{data}@1", *argv)
    assert "resumed from" in p.stdout and "reference log-probs reused" in p.stdout, p.stdout[-2000:]
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    finished = open(os.path.join(out, "train_config.json")).read()
    p = torchrun(2, INJECT, f"skew:{data}@1", *argv)
    assert "nothing to do" in p.stdout and open(os.path.join(out, "train_config.json")).read() == finished


# ----------------------------------------------------------------------------------------------------------
# 5. FSDP2's bf16 policy, run on the CPU under --dtype bf16

def test_fsdp_bf16_policy_two_processes_equal_one(tmp_path, tiny_model_dir):
    """--dtype bf16 gives FSDP2 its bf16 policy on any device (bf16 parameters in the forward and backward,
    gradients reduced in fp32 onto fp32 shards), as a GPU runs it: 2 processes take the steps of 1 (which
    computes under bf16 autocast on fp32 weights) within bf16's tolerance, loss and gradient norm at every step."""
    from lib import dist
    policy = dist.mixed_precision(torch.device("cpu"), "bf16")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert dist.mixed_precision(torch.device("cpu"), "auto").param_dtype is None  # fp32 on the CPU by default
    data = write_pairs(str(tmp_path / "pairs.jsonl"), 20, seed=3)
    common = [SFT, "--model", tiny_model_dir("llama"), "--data", data, "--max-steps", "3", "--eval-pairs", "0",
              "--batch-size", "8", "--dtype", "bf16", "--lr", "2e-3", "--seed", "3"]
    run_script(*common, "--out", str(tmp_path / "p1"), env={"OMP_NUM_THREADS": "1"})
    torchrun(2, *common, "--out", str(tmp_path / "p2"), "--micro-batch-size", "2")
    for a, b in zip(rows(str(tmp_path / "p1")), rows(str(tmp_path / "p2")), strict=True):
        for k in ("loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 2e-2 * abs(a[k]), (a["step"], k, a[k], b[k])
    # (the weights are not compared: AdamW turns bf16's noise on near-zero gradients into whole lr-sized steps)


# ----------------------------------------------------------------------------------------------------------
# 4 and 5 in `python wlt.py estimate`: the packed mask and the unsharded gradients of accumulation

def test_estimate_counts_the_packed_mask_and_accumulated_gradients():
    """The packed-row mask grows as T^2 (with a bf16 bias per layer on CUDA, none with activation checkpointing);
    gradient accumulation on several processes holds every trainable gradient unsharded in fp32."""
    from lib.estimate import KNOWN_CONFIGS, estimate_memory, model_config
    cfg = model_config("facebook/opt-125m")
    a = estimate_memory(cfg, 1, 8, 2, 256, "dpo")["bytes"]
    b = estimate_memory(cfg, 1, 8, 2, 512, "dpo")["bytes"]
    layers = KNOWN_CONFIGS["facebook/opt-125m"]["num_hidden_layers"]
    assert a["mask"] == 2 * 256 ** 2 * (1 + 2 * layers) and b["mask"] == 4 * a["mask"]
    assert estimate_memory(cfg, 1, 8, 2, 512, "dpo", activation_checkpointing=True)["bytes"]["mask"] == 2 * 512 ** 2
    assert estimate_memory(cfg, 1, 8, 2, 512, "sft")["bytes"]["mask"] == 0
    full = estimate_memory(cfg, 2, 0, 2, 256, "sft", batch_size=16)
    assert full["bytes"]["unsharded"] == 4 * full["trainable"]   # 16 / 2 ranks = 8 > micro 2: accumulation
    assert estimate_memory(cfg, 2, 0, 2, 256, "sft", batch_size=4)["bytes"]["unsharded"] == 0   # one micro-batch
    assert estimate_memory(cfg, 1, 0, 2, 256, "sft", batch_size=16)["bytes"]["unsharded"] == 0  # nothing sharded


# ----------------------------------------------------------------------------------------------------------
# 6. The reference cache's key: the dtype used, not the flag

def test_reference_key_holds_the_resolved_dtype_and_device():
    """`--dtype auto` is fp32 on a CPU and bf16 on CUDA: a cache made on one is not reused on the other; fp32 and
    auto on a CPU compute the same numbers and share it. Settings that change only the optimisation share it."""
    import argparse
    import train_dpo
    args = argparse.Namespace(model="m", data="d", out="o", ref=None, dtype="auto", lr=1e-3, beta=0.1, seed=0,
                              batch_size=4, micro_batch_size=None, max_len=64, dist_timeout=60.0)
    key = lambda a, dev: train_dpo.reference_key(a, {"data": 1}, True, torch.device(dev))  # noqa: E731
    cpu = key(args, "cpu")
    assert cpu != key(args, "cuda") and cpu["compute_dtype"] == "torch.float32"
    assert key(args, "cuda")["compute_dtype"] == "torch.bfloat16"
    assert key(argparse.Namespace(**{**vars(args), "dtype": "fp32"}), "cpu") == cpu
    assert key(argparse.Namespace(**{**vars(args), "lr": 5.0, "beta": 0.5, "dist_timeout": 1.0}), "cpu") == cpu
    assert key(argparse.Namespace(**{**vars(args), "seed": 1}), "cpu") != cpu


# ----------------------------------------------------------------------------------------------------------
# 7. The kernel's backward under autocast; 1. sums that CUDA would make nondeterministic; 4. long pairs

def _pairs(tok, n=4):
    from lib import data
    import test_kernel
    exs, _ = data.tokenize_pairs(tok, test_kernel.PAIRS[:n])
    return exs


def test_kernel_backward_reenters_the_forwards_autocast(bpe_tokenizer):
    """OPT-350m's project_out gives the head a bf16 hidden state under autocast while the head's weight is fp32:
    the backward recomputes the logits, and must do so under the forward's autocast (else: `expected m1 and m2
    to have the same dtype`). Its gradients match the fp32 ones within bf16's tolerance."""
    import wlt
    from test_kernel import build
    model = build("opt", len(bpe_tokenizer))  # word_embed_proj_dim 16 < hidden 32: project_in / project_out
    pairs = _pairs(bpe_tokenizer)

    def grads(ctx):
        model.zero_grad(set_to_none=True)
        with ctx:
            out = wlt.pair_logps(model, pairs, 0)
        out.sum().backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    import contextlib
    g32 = grads(contextlib.nullcontext())
    g16 = grads(torch.autocast("cpu", dtype=torch.bfloat16))
    assert g16.keys() == g32.keys()
    a, b = (torch.cat([g[n].flatten() for n in sorted(g32)]) for g in (g16, g32))  # every parameter's gradient
    assert (a - b).norm() <= 0.05 * b.norm(), float((a - b).norm() / b.norm())


class NondeterministicOnCuda(torch.utils._python_dispatch.TorchDispatchMode):
    """Raises on the ops CUDA runs with atomic adds when indices repeat (index_add, index_put with accumulate,
    scatter_add with two targets in one place): their sums then come out in a different order on every run."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("index_add", "index_add_"):
            index = args[2]
            assert index.unique().numel() == index.numel(), f"{name} with repeated indices"
        elif (name in ("index_put", "index_put_", "_index_put_impl_") and (args[3] if len(args) > 3 else kwargs.get("accumulate"))
              and not any(i is not None and i.dtype == torch.bool for i in args[1])):  # a mask takes each place once
            idx = torch.stack([i.flatten() for i in args[1] if i is not None])
            assert torch.unique(idx, dim=1).shape[1] == idx.shape[1], f"{name}(accumulate=True) with repeated indices"
        elif name in ("scatter_add", "scatter_add_"):
            dim, index = args[1], args[2]
            other = [d for d in range(index.dim()) if d != dim % index.dim()]
            keys = torch.cat([torch.stack(torch.meshgrid(*[torch.arange(s) for s in index.shape], indexing="ij"))[other],
                              index[None]]).flatten(1)
            assert torch.unique(keys, dim=1).shape[1] == keys.shape[1], f"{name} with repeated targets"
        return func(*args, **kwargs)


@pytest.mark.parametrize("share", [True, False])
def test_log_prob_sums_are_deterministic_ops(bpe_tokenizer, share):
    """Every sum over a response's tokens is written densely (wlt.row_sums): no op that CUDA would run with
    atomic adds over repeated indices, forward or backward, packed pairs or whole sequences."""
    import wlt
    from test_kernel import build
    model = build("llama", len(bpe_tokenizer))
    pairs = _pairs(bpe_tokenizer)
    with NondeterministicOnCuda():
        wlt.pair_logps(model, pairs, 0, pack=share).sum().backward()
        batch = wlt.collate_pairs(pairs, 0)
        wlt.response_logps(model, **batch).sum().backward()


def test_pairs_longer_than_pack_max_len_run_whole(bpe_tokenizer, monkeypatch):
    """Above wlt.PACK_MAX_LEN tokens in a batch's longest pair no [R, 1, T, T] mask is built: the pairs run as
    whole sequences (flash attention's O(T) memory on CUDA), with the same numbers."""
    import wlt
    from test_kernel import build, close, naive
    model = build("llama", len(bpe_tokenizer))
    pairs = _pairs(bpe_tokenizer)
    with torch.no_grad():
        ref = naive(model, wlt.collate_pairs(pairs, 0))
    masks = []
    forward = model.base_model.forward
    monkeypatch.setattr(model.base_model, "forward",
                        lambda *a, **k: masks.append(k["attention_mask"].dim()) or forward(*a, **k))
    longest = max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in pairs)
    with torch.no_grad():
        wlt.pair_logps(model, pairs, 0, pack=True)
        assert masks == [4]  # packed
        monkeypatch.setattr(wlt, "PACK_MAX_LEN", longest - 1)
        got = wlt.pair_logps(model, pairs, 0, pack=True)
    assert masks == [4, 2]  # whole sequences, a [2B, T] padding mask
    close(got.t().reshape(-1), ref)


# ----------------------------------------------------------------------------------------------------------
# 9. The --ref model freed after the reference pass

def test_the_ref_model_is_freed_before_training(tmp_path, tiny_model_dir, monkeypatch):
    """train_dpo.py --ref loads a second model for the reference pass only: it is gone (no reference left, a
    sharded one's cycle collected) by the time the cache is written, before the loop starts."""
    import sys
    import train_dpo
    from lib import checkpoint, models
    made, seen = [], []
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: (lambda r: made.append(weakref.ref(r[0])) or r)(build(*a, **k)))
    save = checkpoint.save_ref_logps
    monkeypatch.setattr(checkpoint, "save_ref_logps", lambda *a, **k: seen.append([w() is None for w in made]) or save(*a, **k))
    data = write_pairs(str(tmp_path / "pairs.jsonl"), 8, seed=4)
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", "--model", tiny_model_dir("llama"), "--ref", tiny_model_dir("opt"),
                                      "--data", data, "--out", str(tmp_path / "o"), "--max-steps", "1", "--eval-pairs", "0"])
    train_dpo.main()
    assert seen == [[False, True]], seen  # the policy (built first) lives on; the reference is gone


# ----------------------------------------------------------------------------------------------------------
# 9. A sample from non-finite logits; 8. the gold reward in fp32

def test_non_finite_first_logits_are_one_line(tiny_model_dir, bpe_tokenizer, monkeypatch):
    """Should an attention kernel turn a left-padded prompt's row into NaN, sampling stops with one line instead
    of multinomial's traceback (or garbage samples)."""
    import evaluate
    from lib.console import WltError
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    forward = model.forward

    def nan_row(*a, **k):
        out = forward(*a, **k)
        out.logits[1] = float("nan")
        return out
    monkeypatch.setattr(model, "forward", nan_row)
    with pytest.raises(WltError, match=r"non-finite next-token logits .* rows \[1\]"):
        evaluate.generate(model, [[1, 5, 6], [1, 7]], [0, 1], 2, 0, 0.7, 4, torch.device("cpu"), "fp32")


def test_gold_scores_keep_fp32_digits_under_bf16(tmp_path):
    """Under bf16 the reward model's weights and body are bf16, its score head fp32: scores keep their digits
    (bf16 would round a score of 5 to steps of 0.03, and turn close samples into ties), within bf16's tolerance
    of the fp32 model's."""
    import evaluate
    from conftest import make_rm
    for kind in ("chat", "pair"):
        d = make_rm(kind, str(tmp_path / kind))
        items = [("Human: hi\n\nAssistant:", f" reply number {i} with some more words") for i in range(12)]
        scores = {}
        for dtype in ("fp32", "bf16"):
            rm = evaluate.GoldRM(d, "auto", 4, 64, torch.device("cpu"), dtype, False)
            enc = [rm.encode(p, r) for p, r in items]
            with torch.no_grad():
                got = rm.score_batch(list(range(len(enc))), enc)
            scores[dtype] = torch.tensor([got[i] for i in range(len(enc))])
        assert not torch.equal(scores["bf16"], scores["bf16"].bfloat16().float()), kind  # not rounded to bf16
        spread = float(scores["fp32"].abs().max())
        assert (scores["bf16"] - scores["fp32"]).abs().max() <= 0.05 * spread + 1e-3, kind


def test_the_head_in_fp32_under_bf16_autocast():
    """label.py's head_dtype=torch.float32: under bf16 autocast the hidden states stay as the body made them, and
    the head's product and log-softmax are those of fp32, bit for bit, instead of logits rounded to bf16 first."""
    import wlt
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=g).bfloat16()                # what a bf16 body hands the head
    head = {"weight": torch.randn(50, 16, generator=g), "bias": torch.randn(50, generator=g), "scale": 1.0,
            "softcap": None}
    t = torch.randint(0, 50, (7,), generator=g)
    exact = wlt.token_logps(h.float(), head, t)                   # fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_head = wlt.token_logps(h, head, t, head_dtype=torch.float32)
        bf16_head = wlt.token_logps(h, head, t)
    assert torch.equal(fp32_head, exact)
    assert not torch.equal(bf16_head, exact) and (bf16_head - exact).abs().max() < 0.1
