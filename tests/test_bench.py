"""bench.py: the smoke run on a tiny shape (both sides agree, the table is printed) and the agreement check
itself, which must stop a run whose two sides computed different numbers. Timings are not asserted: speed is
bench.py's report, never a test."""
import json
import os

import pytest

import bench
from conftest import ROOT, run_script


def test_tiny_run_prints_the_table(tmp_path):
    out = str(tmp_path / "bench.json")
    p = run_script(os.path.join(ROOT, "extras", "bench.py"), "--model", "tiny", "--tasks", "label,dpo", "--pairs", "8",
                   "--label-batch", "4", "--dpo-batch", "2", "--dpo-steps", "1", "--json", out)
    assert "| labeling pairs/s |" in p.stdout and "| DPO step seconds |" in p.stdout
    res = json.load(open(out))
    for task in ("label", "dpo"):
        assert res[task]["baseline"]["peak"] > 0 and res[task]["wlt"]["flops_per_s"] > 0
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
