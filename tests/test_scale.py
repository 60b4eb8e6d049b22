"""Scaling out (the 7B issue): activation checkpointing, the memory estimator against measured CPU runs, the
estimator's command line, and sharded labeling byte-identical to one process. Meta-device construction with
the weights broadcast from rank 0 is exercised by every torchrun case of test_fsdp.py (2 processes start from,
train to and save exactly the weights of 1 process; per-rank parameter and optimizer memory is half)."""
import copy
import json
import os

import pytest
import torch

import wlt
from lib import data, dist, estimate
from conftest import ROOT, run_script, torchrun

SMALL = dict(model_type="llama", vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)


def saved_bytes(fn) -> int:
    """Bytes of activations autograd keeps for backward while fn() runs (each storage once, parameters not)."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_activation_checkpointing_same_loss_and_gradients_less_memory(family, tiny_model_dir, bpe_tokenizer):
    from transformers import AutoModelForCausalLM
    exs, _ = data.tokenize_pairs(bpe_tokenizer, [
        {"prompt": "Human: How do I bake bread at home? Assistant:", "chosen": " Mix flour, water, salt and yeast.",
         "rejected": " No."},
        {"prompt": "sort: 7 3 9 1 =>", "chosen": " 1 3 7 9", "rejected": " 9 7 3 1 and some more words"}])
    batch = wlt.collate_pairs(exs, data.pad_id(bpe_tokenizer))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
    results = []
    for ac in (False, True):
        model = copy.deepcopy(base).train()  # GPT-2's config has dropout 0.1: the recomputation must replay it
        torch.manual_seed(0)
        wlt.add_lora(model, 4, 8.0)
        for m in wlt.lora_modules(model):  # B != 0, so that A gets gradients too
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
        if ac:
            dist.enable_activation_checkpointing(model)
        torch.manual_seed(1)
        lp, nbytes = saved_bytes(lambda: wlt.response_logps(model, **batch))
        lp.sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        nbytes))
    (lp0, g0, b0), (lp1, g1, b1) = results
    assert torch.allclose(lp0, lp1, rtol=1e-6, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n
    assert b1 < 0.5 * b0, (b0, b1)  # what stays for backward: block inputs instead of every intermediate


@pytest.mark.parametrize("kind,lora,micro,seq,ac", [("sft", 0, 4, 256, False),   # full fine-tune: AdamW dominates
                                                    ("dpo", 8, 4, 512, False),   # LoRA: activations dominate
                                                    ("dpo", 8, 4, 512, True)])   # ... checkpointed
def test_estimate_within_20_percent_of_a_measured_cpu_run(tmp_path, kind, lora, micro, seq, ac):
    cfg_path = str(tmp_path / "config.json")
    with open(cfg_path, "w") as f:
        json.dump(SMALL, f)
    p = run_script(os.path.join(ROOT, "tests", "measure_step.py"), cfg_path, kind, str(lora), str(micro), str(seq),
                   "1" if ac else "0", env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    measured = json.loads(p.stdout.strip().splitlines()[-1])["peak"]
    est = estimate.estimate_memory(estimate.model_config(cfg_path), nproc=1, lora_rank=lora, micro_batch=micro, max_len=seq,
                              kind=kind, dtype="fp32", activation_checkpointing=ac)["bytes"]
    assert abs(est["total"] - measured) <= 0.2 * measured, (est, measured)
    assert measured > 200 * 2 ** 20  # big enough that allocator noise cannot decide the comparison


def test_estimate_parts_follow_the_settings():
    cfg = estimate.model_config("facebook/opt-1.3b")
    one = estimate.estimate_memory(cfg, nproc=1, lora_rank=0, micro_batch=1, max_len=128, kind="sft")
    eight = estimate.estimate_memory(cfg, nproc=8, lora_rank=0, micro_batch=1, max_len=128, kind="sft")
    assert 1.3e9 < one["parameters"] < 1.33e9 and one["trainable"] == one["parameters"]  # OPT-1.3B: 1.316B
    for k in ("weights", "gradients", "optimizer"):  # sharded: 1/8
        assert eight["bytes"][k] == pytest.approx(one["bytes"][k] / 8)
    assert one["bytes"]["weights"] == pytest.approx(4 * one["parameters"])
    assert one["bytes"]["optimizer"] == pytest.approx(8 * one["parameters"])
    h1, h8 = estimate.host_memory(one, 1), estimate.host_memory(eight, 8)
    for k in ("checkpoint save, each rank", "resume, each rank"):  # a rank handles its shard of one file at a time
        assert h8[k] == pytest.approx(h1[k] / 8) and h1[k] < 0.3 * 12 * one["trainable"]
    assert h8["load, rank 0"] == h8["final save, rank 0"] == pytest.approx(4 * one["parameters"])
    assert h8["load, other ranks"] == 0
    lora = estimate.estimate_memory(cfg, nproc=1, lora_rank=8, micro_batch=1, max_len=128, kind="sft")
    assert lora["trainable"] == lora["lora"] < 0.01 * lora["parameters"]
    ac = estimate.estimate_memory(cfg, nproc=1, lora_rank=8, micro_batch=1, max_len=128, kind="sft", activation_checkpointing=True)
    assert ac["bytes"]["activations"] < 0.3 * lora["bytes"]["activations"]
    dpo1 = estimate.estimate_memory(cfg, nproc=1, lora_rank=8, micro_batch=1, max_len=128, kind="dpo")
    dpo2 = estimate.estimate_memory(cfg, nproc=1, lora_rank=8, micro_batch=2, max_len=128, kind="dpo")
    assert dpo2["bytes"]["activations"] == pytest.approx(2 * dpo1["bytes"]["activations"], rel=0.05)  # linear in tokens


def test_estimate_command_line():
    p = run_script(os.path.join(ROOT, "wlt.py"), "estimate", "--model", "mistralai/Mistral-7B-v0.1", "--nproc", "8",
                   "--micro-batch-size", "2", "--device-memory", "80")
    assert "7.24B parameters" in p.stdout and "| total |" in p.stdout and "fits in 80 GiB" in p.stdout
    assert "| resume, each rank |" in p.stdout
    p = run_script(os.path.join(ROOT, "wlt.py"), "estimate", "--model", "no/such-model", check=False)
    assert p.returncode != 0 and "no config for 'no/such-model'" in p.stderr and "Traceback" not in p.stderr


def test_sharded_labeling_is_byte_identical(weighty_model_dir, tmp_path):
    """label.py under 2 processes writes exactly the bytes of 1 process (same thread count on both sides); on
    models whose weights dominate (two ~250 MiB models), each rank's peak host memory over what it held before
    loading stays within 1.15x the bytes of the weights it holds: every weight is read once, with no
    transient second copy (the summary's per-rank fields, ru_maxrss)."""
    rows = [{"prompt": f"Human: question {i} about bread? Assistant:", "chosen": f" answer {i} with flour",
             "rejected": " no" + " more" * (i % 4)} for i in range(13)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref, pol = weighty_model_dir("llama", big=True), weighty_model_dir("gpt_neox", big=True)  # unrelated, one tokenizer
    outs = []
    for n in (1, 2):
        out = str(tmp_path / f"weak-{n}.jsonl")
        args = [os.path.join(ROOT, "label.py"), "--model", pol, "--ref", ref, "--data", str(data), "--out", out,
                "--batch-size", "3"]
        if n == 1:
            run_script(*args, env={"OMP_NUM_THREADS": "1"})
        else:
            torchrun(2, *args)
        outs.append(open(out, "rb").read())
        s = json.load(open(str(tmp_path / f"weak-{n}.summary.json")))
        peak, before, weights = (s[k] for k in ("host_peak_mib_per_rank", "host_before_load_mib_per_rank",
                                                "weights_mib_per_rank"))
        assert len(peak) == len(before) == len(weights) == n
        for r in range(n):
            print(f"label.py, {n} process(es), rank {r}: peak {peak[r]:.0f} MiB, before loading {before[r]:.0f} MiB, "
                  f"weights {weights[r]:.0f} MiB: +{peak[r] - before[r]:.0f} MiB = "
                  f"{(peak[r] - before[r]) / weights[r]:.2f}x the weights")
            assert weights[r] > 450  # both models (~250 MiB each), fp32 on CPU
            assert peak[r] - before[r] <= 1.15 * weights[r], (n, r, peak, before, weights)
    assert outs[0] == outs[1] and outs[0].count(b"\n") == 13
