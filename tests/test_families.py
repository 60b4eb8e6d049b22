"""Every family users fine-tune, through every stage (tests/family_runs.py does the runs): SFT and full DPO with
a mid-run checkpoint, crashed after it and resumed, LoRA DPO, label.py with the adapter on/off and with two
models. Tied input/output embeddings (OPT, GPT-2, SmolLM2 / Llama-3.2, Qwen2.5, Gemma) are the case the rows are
built around: a tied pair is stored once in a checkpoint, is still one parameter after a resume, and the final
folder loads with from_pretrained, tied, giving the trained model's logits. One tied and one untied family also
run on 2 processes (FSDP2), in one torchrun launch."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import family_runs
from conftest import ROOT, torchrun


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_bit_equal(a: str, b: str) -> None:
    x, y = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k}: the resumed run differs from the uninterrupted one"


def check_kill_and_resume(row: str, tied: bool, run: dict, base: str) -> None:
    """The resumed run equals the uninterrupted one bit for bit; the tie is stored once and holds."""
    keys = run["checkpoint_keys"]
    heads = [k for k in keys if k.endswith("lm_head.weight")]
    assert keys and (heads == [] if tied else len(heads) == 1), (row, heads)
    assert run["resume"]["tied_after_resume"] is tied, row
    assert_bit_equal(run["full"], run["cut"])
    assert [r["step"] for r in read_jsonl(os.path.join(run["cut"], "metrics.jsonl"))] == [1, 2, 3, 4]
    start = load_file(os.path.join(base, "model.safetensors"))
    trained = load_file(os.path.join(run["full"], "model.safetensors"))
    # names as saved (transformers may save a head under a legacy name, e.g. GPT-NeoX's embed_out)
    assert any(not torch.equal(start[k], trained[k]) for k in start.keys() & trained.keys()), \
        f"{row}: training changed nothing"


def check_final_folder(row: str, tied: bool, run: dict) -> None:
    """from_pretrained reads the final folder, keeps the tie, and gives the trained model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = run["full"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert family_runs.is_tied(model) is tied, row
    if tied:  # stored once: the head is not a second tensor in the file
        assert not any(k.endswith("lm_head.weight") for k in load_file(os.path.join(out, "model.safetensors")))
    ids = AutoTokenizer.from_pretrained(out)(family_runs.PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.allclose(logits, run["full_seen"]["logits"], rtol=1e-5, atol=1e-5), \
        (row, (logits - run["full_seen"]["logits"]).abs().max())
    assert torch.equal(run["resume"]["logits"], run["full_seen"]["logits"]), row


@pytest.mark.parametrize("row", list(family_runs.ROWS))
def test_family(row, tmp_path, bpe_tokenizer):
    rep = family_runs.run_row(row, str(tmp_path), bpe_tokenizer)
    tied = rep["tied"]
    for stage in ("sft", "dpo"):
        check_kill_and_resume(f"{row} {stage}", tied, rep[stage], rep["base"])
        check_final_folder(f"{row} {stage}", tied, rep[stage])
    # LoRA DPO: an adapter in PEFT's layout beside the merged model
    assert os.path.isfile(os.path.join(rep["lora"], "adapter", "adapter_model.safetensors")), row
    # label.py: the adapter switched on and off over the reference == the merged model and the reference
    labels = {k: read_jsonl(v) for k, v in rep["labels"].items()}
    for a, m in zip(labels["adapter"], labels["merged"]):
        for k in ("chosen_reward", "rejected_reward"):
            assert a[k] == pytest.approx(m[k], rel=1e-4, abs=1e-5), (row, k)
        assert (a["chosen"], a["human_agrees"]) == (m["chosen"], m["human_agrees"]) or \
            abs(a["chosen_reward"] - a["rejected_reward"]) < 1e-4, row
    for name in ("adapter", "full"):  # the trained policies differ from their reference
        rewards = [r[k] for r in labels[name] for k in ("chosen_reward", "rejected_reward")]
        assert len(labels[name]) == 16 and max(map(abs, rewards)) > 1e-3, (row, name)
        assert all(r["chosen_reward"] >= r["rejected_reward"] for r in labels[name]), (row, name)


def test_families_on_two_processes(tmp_path):
    """FSDP2 over 2 processes, a tied and an untied family: SFT and full DPO crashed after a checkpoint and
    resumed end with the uninterrupted run's weights bit for bit; the head is still the input embedding
    after the resume (looked at on the sharded model)."""
    rows = ["llama-tied", "gpt_neox"]
    report = str(tmp_path / "report.json")
    p = torchrun(2, os.path.join(ROOT, "tests", "family_runs.py"), report, str(tmp_path), *rows)
    assert "2 process(es)" in p.stdout
    reports = json.load(open(report))
    for row in rows:
        rep = reports[row]
        assert rep["tied"] is family_runs.ROWS[row][2]
        for stage in ("sft", "dpo"):
            check_kill_and_resume(f"{row} {stage} x2", rep["tied"], rep[stage], rep["base"])
