"""bench.py: the smoke run on a tiny model folder and a pair file (both sides agree, the table is printed; TRL's
side, absent from the project's environment, is skipped with its reason) and the agreement check itself, which
must stop a run whose two sides computed different numbers. Timings are not asserted: speed is bench.py's
report, never a test."""
import json
import os

import pytest

import bench
from conftest import ROOT, run_script


def test_tiny_run_on_a_pair_file_prints_the_table(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    words = "the cat sat on a mat and then it ran off to see the dog".split()
    with open(pairs, "w") as f:
        for i in range(10):
            f.write(json.dumps({"prompt": " ".join(words[i:i + 4 + i % 3]) + " ?", "chosen": " " + " ".join(words[:3 + i % 4]),
                                "rejected": " " + " ".join(words[5:7 + i % 5])}) + "\n")
    out = str(tmp_path / "bench.json")
    p = run_script(os.path.join(ROOT, "extras", "bench.py"), "--model", tiny_model_dir("llama"), "--pairs", str(pairs),
                   "--tasks", "label,dpo", "--num-pairs", "8", "--label-batch", "4", "--dpo-batch", "2",
                   "--dpo-steps", "1", "--trl-python", os.path.join(str(tmp_path), "no-python"), "--json", out)
    assert "| labeling pairs/s |" in p.stdout and "| DPO step seconds |" in p.stdout
    assert "TRL side skipped: " in p.stdout and "cannot import trl" in p.stdout
    res = json.load(open(out))
    for task in ("label", "dpo"):
        assert res[task]["baseline"]["peak"] > 0 and res[task]["wlt"]["flops_per_s"] > 0 and "trl" not in res[task]
    assert "labels identical on 8/8" in res["label"]["same_numbers"]


def test_disagreeing_sides_stop_the_run():
    a = {"logps": [[-10.0, -12.0, -11.0, -11.0]]}
    assert "identical on 1/1" in bench.check_same("label", a, {"logps": [[-10.0, -12.0, -11.0, -11.0]]})
    with pytest.raises(SystemExit, match="log-probs differ"):
        bench.check_same("label", a, {"logps": [[-10.0, -12.5, -11.0, -11.0]]})
    with pytest.raises(SystemExit, match="first_loss differs"):
        bench.check_same("dpo", {"first_loss": 0.69, "first_grad_norm": 1.0}, {"first_loss": 0.70, "first_grad_norm": 1.0})
    with pytest.raises(SystemExit, match="sft: loss differs"):
        bench.check_same("sft", {"first_loss": 7.0}, {"first_loss": 7.01})
    # TRL's side: its reference log-probs against wlt's pi_ref columns; its first loss with a fresh adapter is log 2
    assert "max |diff|" in bench.check_trl("label", {"ref_logps": [[-11.0, -11.0]]}, a, bench.FP32_TOL)
    with pytest.raises(SystemExit, match="TRL's reference log-probs differ"):
        bench.check_trl("label", {"ref_logps": [[-11.0, -11.5]]}, a, bench.FP32_TOL)
    with pytest.raises(SystemExit, match="not log 2"):
        bench.check_trl("dpo", {"first_loss": 0.70}, {}, bench.FP32_TOL)
