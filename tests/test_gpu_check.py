"""extras/gpu_check.py in its dry mode (tiny shapes on the CPU, what a machine without a GPU can run), and the
checks its steps judge by: the results tables of step b, the bit-equality of step c, a missing input. Also
WLT_TEST_DEVICE (tests/conftest.py), which its step a sets: the scripts' fp32, a device that cannot be had."""
import json
import os
import re
import types

import pytest
import torch
from safetensors.torch import save_file

import gpu_check
from conftest import ROOT, run_script


def test_dry_mode_runs_the_steps_and_prints_the_table(tmp_path):
    """Steps a, d, e and f (b runs launch.sh's eight stages and c three DPO runs: too long for the suite; c's kill
    and resume are test_faults.py's first test, its comparison is tested below; f's 2 processes run on gloo)."""
    out = str(tmp_path / "check")
    p = run_script(os.path.join(ROOT, "extras", "gpu_check.py"), "--dry", "--steps", "adef", "--out", out)
    assert "dry mode" in p.stdout
    lines = p.stdout.splitlines()
    for s in "adef":
        assert any(x.startswith(f"PASS {s} ") for x in lines), p.stdout
        assert any(x.startswith(f"| {s} | PASS |") for x in lines), p.stdout  # the final table
    assert "passed" in next(x for x in lines if x.startswith("PASS a "))
    assert "DPO step" in next(x for x in lines if x.startswith("PASS d "))
    assert "estimate" in next(x for x in lines if x.startswith("PASS e "))
    assert "2 processes (gloo): 1 passed" in next(x for x in lines if x.startswith("PASS f "))
    assert {"a_tests.log", "d_bench.log", "bench.json", "f_two_processes.log", "gpu_check.json"} <= set(os.listdir(out))
    summary = json.load(open(os.path.join(out, "gpu_check.json")))
    assert [(r["step"], r["ok"]) for r in summary["steps"]] == [("a", True), ("d", True), ("e", True), ("f", True)]


def test_results_tables_within_and_beyond_their_standard_errors():
    cpu = gpu_check.results_table(open(os.path.join(ROOT, "README.md")).read())
    assert len(cpu) == 4 and all(se > 0 for _, se in cpu.values())
    ok, fig = gpu_check.compare_tables(cpu, dict(cpu))
    assert ok and "gap to the CPU table 0.00 combined SE" in fig
    name, (mean, se) = next(iter(cpu.items()))
    close = dict(cpu, **{name: (mean + 2 * se, se)})       # 2 / sqrt(2) = 1.4 combined SE
    far = dict(cpu, **{name: (mean + 5 * se, se)})         # 5 / sqrt(2) = 3.5 combined SE
    assert gpu_check.compare_tables(cpu, close)[0]
    ok, fig = gpu_check.compare_tables(cpu, far)
    assert not ok and name in fig
    assert not gpu_check.compare_tables(cpu, {k: v for k, v in cpu.items() if k != name})[0]
    assert not gpu_check.compare_tables(cpu, {})[0]


def test_same_weights_is_bitwise(tmp_path):
    def finished_run(d, delta):
        os.makedirs(os.path.join(d, "adapter"))
        save_file({"w": torch.ones(3, device="cpu")}, os.path.join(d, "model.safetensors"))
        save_file({"a": torch.full((2,), 1.0 + delta, device="cpu")}, os.path.join(d, "adapter", "adapter_model.safetensors"))
    a, b, c = (str(tmp_path / n) for n in "abc")
    finished_run(a, 0.0)
    finished_run(b, 0.0)
    finished_run(c, 2 ** -20)  # one unit in the last place of fp32 near 1 is 2^-23: far below any tolerance
    assert gpu_check.same_weights(a, b) == (True, "bit-equal (2 tensors)")
    ok, fig = gpu_check.same_weights(a, c)
    assert not ok and "not bit-equal" in fig and "a" in fig


def test_a_step_without_its_input_fails_with_a_reason(tmp_path):
    r = gpu_check.step_e(types.SimpleNamespace(dry=True), str(tmp_path))
    assert not r.ok and r.line() == "FAIL e no bench.json: step d did not run"


@pytest.mark.parametrize("steps", ["x", ""])
def test_bad_steps_are_a_usage_error(steps, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--steps", steps])
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err


def test_scripts_run_in_fp32_on_the_test_device(monkeypatch):
    import conftest
    dpo, inject = os.path.join(ROOT, "train_dpo.py"), os.path.join(ROOT, "tests", "inject.py")
    monkeypatch.setattr(conftest, "TEST_DEVICE", "cuda")
    assert conftest.on_test_device((dpo, "--lr", "1")) == [dpo, "--lr", "1", "--dtype", "fp32"]
    assert conftest.on_test_device((inject, "step:5", dpo))[-2:] == ["--dtype", "fp32"]
    assert conftest.on_test_device(("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "label.py"))[-1] == "fp32"
    assert conftest.on_test_device((dpo, "--dtype", "bf16")) == [dpo, "--dtype", "bf16"]  # a test's own choice stays
    assert conftest.on_test_device(("wlt.py", "prepare")) == ["wlt.py", "prepare"]    # no --dtype flag there
    monkeypatch.setattr(conftest, "TEST_DEVICE", "cpu")
    assert conftest.on_test_device((dpo,)) == [dpo]


@pytest.mark.parametrize("value, message", [("cuda", "WLT_TEST_DEVICE=cuda, but torch sees no CUDA device"),
                                            ("tpu", "WLT_TEST_DEVICE='tpu': use cpu (the default) or cuda")])
def test_a_test_device_that_cannot_be_had_stops_the_suite_in_one_line(value, message, monkeypatch):
    import runpy
    monkeypatch.setenv("WLT_TEST_DEVICE", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.exit.Exception, match=re.escape(message)):
        runpy.run_path(os.path.join(ROOT, "tests", "conftest.py"))  # what pytest does first
