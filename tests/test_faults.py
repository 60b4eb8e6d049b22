"""Nothing lost, nothing silent: runs killed with SIGKILL at exact places (tests/inject.py, from outside) and
rerun must end with the outputs of an uninterrupted run; a NaN loss stops before the update; bad input is a
one-line error naming file:line."""
import glob
import json
import os
import shutil
import signal
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, torchrun

SFT = os.path.join(ROOT, "train_sft.py")
DPO = os.path.join(ROOT, "train_dpo.py")
LABEL = os.path.join(ROOT, "label.py")
INJECT = os.path.join(ROOT, "tests", "inject.py")
EVAL = os.path.join(ROOT, "evaluate.py")
KILLED = -signal.SIGKILL


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def same_weights(a: str, b: str, name: str = "model.safetensors", bitwise: bool = False, atol: float = 1e-6) -> None:
    x, y = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]) if bitwise else torch.allclose(x[k], y[k], atol=atol, rtol=0), k


def assert_no_pickle(folder: str) -> list[str]:
    """Every file of a mid-run checkpoint is safetensors or plain data that torch.load reads with
    weights_only=True (which refuses anything but tensors, numbers, strings and containers of them). Returns
    the safetensors files."""
    from safetensors import safe_open
    names = sorted(os.listdir(folder))
    assert "state.pt" in names
    shards = []
    for n in names:
        path = os.path.join(folder, n)
        if n.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                assert list(f.keys()), n
            shards.append(n)
        else:
            torch.load(path, weights_only=True)
    return shards


def test_dpo_killed_then_resumed_equals_uninterrupted(synthetic_run, tmp_path):
    """LoRA DPO with LoRA dropout (so the RNG state matters), checkpoints every 2 steps, killed before step 5."""
    args = ["--model", os.path.join(synthetic_run, "models", "teacher-base"), "--data",
            os.path.join(synthetic_run, "data", "labeled.jsonl"), "--max-steps", "6", "--batch-size", "8",
            "--save-every", "2", "--lora-dropout", "0.2", "--lr", "1e-2", "--eval-pairs", "0"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_script(DPO, *args, "--out", full)
    p = run_script(INJECT, "step:5", DPO, *args, "--out", cut, check=False)
    assert p.returncode == KILLED
    assert not os.path.exists(os.path.join(cut, "train_config.json"))  # not finished, and does not look it
    assert torch.load(os.path.join(cut, "checkpoint", "state.pt"), weights_only=True)["step"] == 4
    p = run_script(DPO, *args, "--out", cut, "--resume")
    assert "resumed from" in p.stdout and "at step 4" in p.stdout
    same_weights(full, cut)
    same_weights(full, cut, os.path.join("adapter", "adapter_model.safetensors"))
    a, b = read_jsonl(os.path.join(full, "metrics.jsonl")), read_jsonl(os.path.join(cut, "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 7))  # every step exactly once
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
    assert not os.path.exists(os.path.join(cut, "checkpoint"))  # removed once the run is complete


def test_checkpoint_of_other_settings_is_not_used(synthetic_run, tmp_path):
    args = ["--model", os.path.join(synthetic_run, "models", "teacher-base"), "--data",
            os.path.join(synthetic_run, "data", "labeled.jsonl"), "--max-steps", "4", "--batch-size", "8",
            "--save-every", "2", "--eval-pairs", "0", "--out", str(tmp_path / "o")]
    p = run_script(INJECT, "step:4", SFT, *args, check=False)
    assert p.returncode == KILLED
    # a shard file damaged from outside: a one-line error naming the checkpoint, not a traceback
    ckpt = str(tmp_path / "o" / "checkpoint")
    shard = os.path.join(ckpt, sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))[-1])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    p = run_script(SFT, *args, "--resume", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"{ckpt}: cannot read the checkpoint" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run_script(SFT, *args, "--lr", "1e-3", "--resume")
    assert "made with other settings" in p.stdout and "resumed from" not in p.stdout


def test_sft_two_processes_killed_then_resumed(synthetic_run, tmp_path):
    """FSDP2 over 2 processes: rank 1 is killed before step 4; the rerun resumes from the sharded checkpoint of
    step 2 and ends with the weights of an uninterrupted 2-process run. Then SIGTERM mid-run: a checkpoint at the
    step boundary, and --resume ends with the same weights, every metric row once."""
    args = ["--model", os.path.join(synthetic_run, "models", "teacher-base"), "--data",
            os.path.join(synthetic_run, "data", "labeled.jsonl"), "--max-steps", "5", "--batch-size", "8",
            "--save-every", "2", "--eval-pairs", "0", "--lr", "1e-2"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    torchrun(2, SFT, *args, "--out", full)
    p = torchrun(2, INJECT, "step:4@1", SFT, *args, "--out", cut, check=False)
    assert p.returncode != 0 and not os.path.exists(os.path.join(cut, "train_config.json"))
    shards = assert_no_pickle(os.path.join(cut, "checkpoint"))
    # each rank writes its own files: one per transformer block (2) and one for the rest
    assert sorted(shards) == [f"shard-0000{r}-model-0000{f}-of-00003.safetensors" for r in (1, 2) for f in (1, 2, 3)]
    p = torchrun(2, SFT, *args, "--out", cut, "--resume")
    assert "at step 2" in p.stdout and "not be bit-equal" not in p.stdout
    same_weights(full, cut, bitwise=True)
    assert [r["step"] for r in read_jsonl(os.path.join(cut, "metrics.jsonl"))] == list(range(1, 6))
    # SIGTERM to torchrun (as a scheduler stops a job) after step 3's update on rank 0 (not a --save-every
    # step): every rank saves the checkpoint of step 3 at the step boundary and the run stops non-zero;
    # --resume ends bit-equal again
    term = str(tmp_path / "term")
    p = torchrun(2, INJECT, "term:3", SFT, *args, "--out", term, check=False)
    assert p.returncode != 0 and not os.path.exists(os.path.join(term, "train_config.json")), p.stderr
    assert torch.load(os.path.join(term, "checkpoint", "state.pt"), weights_only=True)["step"] == 3, p.stderr
    assert "stopped by SIGTERM; saved a checkpoint of step 3" in p.stderr and "--resume" in p.stderr, p.stderr
    assert [r["step"] for r in read_jsonl(os.path.join(term, "metrics.jsonl"))] == [1, 2, 3]
    p = torchrun(2, SFT, *args, "--out", term, "--resume")
    assert "at step 3" in p.stdout
    same_weights(full, term, bitwise=True)
    assert [r["step"] for r in read_jsonl(os.path.join(term, "metrics.jsonl"))] == list(range(1, 6))


def test_resume_reads_only_this_ranks_share(weighty_model_dir, tmp_path):
    """A full fine-tune of a model whose weights dominate (~50 MiB; its checkpoint, weights + AdamW moments,
    ~150 MiB), killed after the checkpoint of step 2 and resumed twice from that checkpoint: by 1 process and by
    2 (the warning; DCP reshards). Each of the 2 ranks' peak host memory while resuming (tests/host_peak.py:
    ru_maxrss over load_checkpoint, from the RSS before it) is about half of the 1-process resume's: a rank
    reads only the slices it holds, one file at a time, and creates only its shard of the moments. The
    checkpoint holds no pickle."""
    from test_fsdp import write_pairs
    model = weighty_model_dir("llama")
    data = write_pairs(str(tmp_path / "pairs.jsonl"), 40, seed=1)
    args = ["--model", model, "--data", data, "--max-steps", "4", "--batch-size", "8", "--save-every", "2",
            "--eval-pairs", "0", "--lr", "1e-3", "--max-len", "48"]
    out, first = str(tmp_path / "out"), str(tmp_path / "resumed-by-1")
    p = run_script(INJECT, "step:3", SFT, *args, "--out", out, check=False, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == KILLED
    ckpt = os.path.join(out, "checkpoint")
    assert len(assert_no_pickle(ckpt)) == 5  # one file per transformer block (4) and one for the rest
    ckpt_mib = sum(os.path.getsize(f) for f in glob.glob(os.path.join(ckpt, "*.safetensors"))) / 2 ** 20
    shutil.copytree(ckpt, str(tmp_path / "saved"))  # --out is a setting: both resumes use the same folder
    peak = str(tmp_path / "peak")
    measure = [os.path.join(ROOT, "tests", "host_peak.py"), "lib.checkpoint.load_checkpoint"]
    p = run_script(*measure, peak + "-1", SFT, *args, "--out", out, "--resume", env={"OMP_NUM_THREADS": "1"})
    assert "at step 2" in p.stdout and "not be bit-equal" not in p.stdout
    os.makedirs(first)
    os.replace(os.path.join(out, "model.safetensors"), os.path.join(first, "model.safetensors"))
    os.remove(os.path.join(out, "train_config.json"))
    shutil.copytree(str(tmp_path / "saved"), ckpt)
    p = torchrun(2, *measure, peak + "-2", SFT, *args, "--out", out, "--resume")
    assert "at step 2" in p.stdout and "saved by 1 process(es), resumed by 2" in p.stdout
    same_weights(first, out, atol=1e-5)  # resharded: close, not bit-equal
    d1 = [json.loads(x)["delta_mib"] for x in open(peak + "-1.rank-0.jsonl")]
    d2 = [json.loads(open(f"{peak}-2.rank-{r}.jsonl").read())["delta_mib"] for r in (0, 1)]
    print(f"resume peak host memory: 1 process +{d1[0]:.0f} MiB, 2 processes +{d2[0]:.0f} / +{d2[1]:.0f} MiB "
          f"per rank (checkpoint {ckpt_mib:.0f} MiB)")
    # what resuming adds on one process: the AdamW moments (2/3 of the checkpoint) and a file being read
    assert len(d1) == 1 and d1[0] > 0.8 * ckpt_mib
    assert max(d2) < 0.75 * d1[0], (d1, d2)


def test_nan_loss_stops_before_the_update(synthetic_run, tmp_path):
    out = str(tmp_path / "o")
    p = run_script(DPO, "--model", os.path.join(synthetic_run, "models", "teacher-base"), "--data",
                   os.path.join(synthetic_run, "data", "labeled.jsonl"), "--max-steps", "6", "--batch-size", "8",
                   "--lr", "1e30", "--eval-pairs", "0", "--out", out, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "loss is nan at step" in p.stderr or "loss is inf at step" in p.stderr
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "train_config.json"))


def test_label_killed_then_resumed(synthetic_run, tmp_path):
    """label.py killed after 3 batches resumes from OUT.partial/: every row exactly once, in the input order,
    byte-identical to an uninterrupted run."""
    m = os.path.join(synthetic_run, "models")
    data = str(tmp_path / "pairs.jsonl")
    with open(os.path.join(synthetic_run, "data", "unlabeled.jsonl")) as f, open(data, "w") as g:
        g.writelines(line for _, line in zip(range(40), f))
    args = ["--model", f"{m}/student-base", "--ref", f"{m}/teacher-base", "--data", data, "--batch-size", "4"]
    full, cut = str(tmp_path / "full.jsonl"), str(tmp_path / "cut.jsonl")
    run_script(LABEL, *args, "--out", full)
    p = run_script(INJECT, "batch:3", LABEL, *args, "--out", cut, check=False)
    assert p.returncode == KILLED and not os.path.exists(cut)
    assert len(read_jsonl(os.path.join(cut + ".partial", "rank-0.jsonl"))) == 3
    p = run_script(LABEL, *args, "--out", cut)
    assert "resuming with 3" in p.stdout
    assert open(full).read() == open(cut).read()
    assert not os.path.exists(cut + ".partial")
    s = json.load(open(str(tmp_path / "cut.summary.json")))
    assert s["resumed_pairs"] == 12 and s["labeled"] == 40  # pairs/s counts the 28 labeled by this run only
    # a cut last line (a kill in the middle of a write) is skipped, not fatal
    os.remove(cut)
    p = run_script(INJECT, "batch:2", LABEL, *args, "--out", cut, check=False)
    assert p.returncode == KILLED
    with open(os.path.join(cut + ".partial", "rank-0.jsonl"), "a") as f:
        f.write('{"k": "label:9", "v": [[1, ')
    p = run_script(LABEL, *args, "--out", cut)
    assert "resuming with 2" in p.stdout
    assert open(full).read() == open(cut).read()


def test_evaluate_killed_then_resumed(synthetic_run, tmp_path):
    m = os.path.join(synthetic_run, "models")
    args = ["--run-dir", synthetic_run, "--num-prompts", "20", "--max-new-tokens", "5", "--batch-size", "4",
            "--policy", f"a={m}/teacher-base", "--policy", f"b={m}/student-base"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_script(EVAL, *args, "--out", full)
    p = run_script(INJECT, "batch:7", EVAL, *args, "--out", cut, check=False)  # inside policy b
    assert p.returncode == KILLED and not os.path.exists(os.path.join(cut, "results.json"))
    p = run_script(EVAL, *args, "--out", cut)
    assert "resuming with 7" in p.stdout
    assert open(os.path.join(full, "generations.jsonl")).read() == open(os.path.join(cut, "generations.jsonl")).read()
    assert open(os.path.join(full, "results.md")).read() == open(os.path.join(cut, "results.md")).read()


def test_malformed_lines_are_one_line_errors(tmp_path):
    """Through the scripts as typed: test_robustness.py (a malformed line, invalid UTF-8, for each script)."""
    from lib.console import WltError
    from lib.data import read_pairs
    data = str(tmp_path / "bad.jsonl")
    with open(data, "w") as f:
        f.write('["a list"]\n')
    with pytest.raises(WltError, match=f"{data}:1: expected a JSON object"):
        read_pairs(data)


def test_older_torch_is_named_in_one_line(monkeypatch):
    """A torch whose torch.distributed.checkpoint has no safetensors storage (older releases): mid-run
    checkpoints say what they need, in one line."""
    import torch.distributed.checkpoint as dcp
    from lib import checkpoint
    from lib.console import WltError
    monkeypatch.delattr(dcp, "HuggingFaceStorageWriter")
    with pytest.raises(WltError, match=r"need a torch whose .*HuggingFaceStorageWriter.*this is torch .*--save-every 0"):
        checkpoint.require_dcp()


def final_files(folder: str) -> dict:
    """relative path -> SHA-256 of each file of the final output in `folder` (the entries its marker lists)."""
    import hashlib
    out = {}
    for name in json.load(open(os.path.join(folder, "train_config.json")))["files"] + ["train_config.json"]:
        path = os.path.join(folder, name)
        for f in ([path] if os.path.isfile(path) else glob.glob(os.path.join(path, "**", "*"), recursive=True)):
            if os.path.isfile(f):
                out[os.path.relpath(f, folder)] = hashlib.sha256(open(f, "rb").read()).hexdigest()
    return out


def test_a_kill_at_any_step_of_the_final_switch(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """A finished SFT output (with a file of the user's in it) trained again with other settings and SIGKILLed
    inside its final switch (tests/inject.py swap:N, from outside), at every step of it: each rename of the run's
    and the user's files into the new folder, the exchange of the two folders, the renames of file systems that
    cannot exchange, the deletion of the previous output. At every step the folder is the old output whole or
    the new one whole, or absent (only between the two renames where there is no exchange); a stage that reads it
    (label.py, as typed) completes the switch and reads the new output, and so does the trainer's rerun: the new
    output whole, the run's files and the user's beside it, nothing left over. The trainer itself is killed at the
    switch's first step (a subprocess); the later steps are cut in forked children of this process, which finish
    that same switch (outputs.finish_swap, what every later start runs) and are killed at step N."""
    import inject
    from as_typed import run_case
    from lib import outputs
    data = str(tmp_path / "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": f"Human: question {i}? Assistant:", "chosen": f" good {i}.",
                                 "rejected": f" bad {i}"}) + "\n" for i in range(12))
    model = tiny_model_dir("llama")
    base = ["--model", model, "--data", data, "--batch-size", "4", "--eval-pairs", "0", "--max-steps", "2"]
    src = str(tmp_path / "src" / "sft")
    monkeypatch.chdir(ROOT)
    assert run_case("train_sft.py", [*base, "--out", src])[0] == 0
    open(os.path.join(src, "notes.txt"), "w").write("the user's own notes\n")
    old = final_files(src)
    p = run_script(INJECT, "swap:1", SFT, *base, "--lr", "1e-3", "--resume", "--out", src, check=False)
    assert p.returncode == KILLED, p.stderr[-2000:]
    new = final_files(outputs.staging(src))
    assert final_files(src) == old and old != new  # the trainer died before the first step: the old one, whole

    states = []
    for exchange in (True, False):
        for n in range(1, 20):
            d = str(tmp_path / f"{'x' if exchange else 'r'}{n}")
            shutil.copytree(os.path.dirname(src), d, symlinks=True)
            out = os.path.join(d, "sft")
            pid = os.fork()
            if pid == 0:  # the child: file operations only, then gone
                try:
                    if not exchange:
                        outputs._exchange = lambda a, b: False  # a file system that cannot exchange folders
                    inject.kill_in_swap(n)
                    outputs.finish_swap(out, "train_config.json")
                finally:
                    os._exit(0)
            killed = os.WIFSIGNALED(os.waitpid(pid, 0)[1])
            if os.path.isfile(os.path.join(out, "train_config.json")):
                assert final_files(out) in (old, new), (exchange, n)
                looks = "new" if final_files(out) == new else "old"
            else:
                assert not exchange and not os.path.exists(out), n  # only between the two renames
                looks = "absent"
            where = [p for p in (out, outputs.staging(out)) if os.path.isfile(os.path.join(p, "notes.txt"))]
            assert len(where) == 1, (exchange, n)  # the user's file: in one of the two folders, never lost
            states.append((d, looks))
            if not killed:
                break
        assert n >= 5, n  # the steps were reached: 3 files moved, the switch, the deletion
    assert {looks for _, looks in states} == {"old", "new", "absent"}

    for d, looks in [*states, (os.path.dirname(src), "old")]:  # what reads it next: label.py; the trainer's rerun
        out = os.path.join(d, "sft")
        cut = outputs.cut_swap(out)
        assert cut or looks == "new"  # the old one whole always has the new one staged beside it
        if out == src:  # the same command again (a copy elsewhere would be another --out: trained again)
            code, stdout, stderr = run_case("train_sft.py", [*base, "--lr", "1e-3", "--resume", "--out", out])
            assert code == 0 and "nothing to do" in stdout, (looks, stderr[-2000:])
        else:
            code, stdout, stderr = run_case("label.py", ["--model", out, "--ref", model, "--data", data,
                                                         "--out", os.path.join(d, "w.jsonl")])
            assert code == 0, (looks, stderr[-2000:])
        assert ("completed the final save that a kill had cut" in stdout) == cut, (looks, stdout)
        assert final_files(out) == new
        assert {"notes.txt", "metrics.jsonl", "written_by.json"} <= set(os.listdir(out))
        assert open(os.path.join(out, "notes.txt")).read() == "the user's own notes\n"
        # nothing left over; the killed trainer's lock stays until a run takes it over (one that completes a switch)
        left = {"sft"} | ({"w.jsonl", "w.summary.json"} if out != src else set()) | (set() if cut else {"sft.lock"})
        assert set(os.listdir(d)) == left, (looks, os.listdir(d))


def test_names_beside_a_folder_no_trainer_wrote_are_left_alone(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """A stage reading a model folder that no trainer wrote never takes the user's folders named like a switch's
    (M.staging/ holding a trainer's finished output, M.replaced/) for a cut switch: nothing moved or deleted."""
    from as_typed import run_case, snapshot
    model = shutil.copytree(tiny_model_dir("gpt2"), str(tmp_path / "m"))
    shutil.copytree(model, str(tmp_path / "m.staging"))
    json.dump({"script": "train_sft.py", "args": {}, "files": ["model.safetensors"]},
              open(str(tmp_path / "m.staging" / "train_config.json"), "w"))
    os.makedirs(str(tmp_path / "m.replaced"))
    open(str(tmp_path / "m.replaced" / "mine.txt"), "w").write("the user's own\n")
    open(str(tmp_path / "m.lock"), "w").write("")  # even beside a lock file
    before = snapshot(str(tmp_path))
    monkeypatch.chdir(ROOT)
    code, _, stderr = run_case("label.py", ["--model", model, "--ref", tiny_model_dir("llama"), "--data",
                                            str(tmp_path / "goood.jsonl"), "--out", str(tmp_path / "w.jsonl")])
    assert code == 1 and "goood.jsonl: no such file" in stderr, stderr
    assert snapshot(str(tmp_path)) == before


def test_one_run_per_output_under_torchrun_and_after_a_kill(tiny_model_dir, tmp_path, monkeypatch,
                                                            one_thread):
    """A trainer under torchrun (2 processes) holds its --out: rank 0 alone takes OUT.lock, naming itself; a second
    run on that --out, as typed, is refused with one line naming the first, and changes nothing. Rank 0
    SIGKILLed (no cleanup runs): the lock stays, its process gone; the same command again takes it over with a word
    and trains."""
    import subprocess
    from as_typed import run_case, snapshot
    data = str(tmp_path / "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": f"Human: question {i}? Assistant:", "chosen": f" good {i}.",
                                 "rejected": f" bad {i}"}) + "\n" for i in range(12))
    out = str(tmp_path / "sft")
    base = ["--model", tiny_model_dir("llama"), "--data", data, "--eval-pairs", "0", "--out", out]
    first = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SFT,
                              *base, "--batch-size", "2", "--epochs", "1000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        holder = {}
        for _ in range(600):  # until rank 0 has taken the lock
            try:
                holder = json.load(open(out + ".lock"))
                break
            except (OSError, ValueError):
                time.sleep(0.1)
        assert holder.get("processes") == 2, holder
        assert "RANK=0" in open(f"/proc/{holder['pid']}/environ").read().split("\0")  # rank 0 holds it
        monkeypatch.chdir(ROOT)
        before = snapshot(str(tmp_path))
        code, stdout, stderr = run_case("train_sft.py", [*base, "--max-steps", "1"])
        assert code == 1 and stderr.strip().splitlines() == [
            f"error: --out {out} is in use by another run: `{holder['command']}` (process {holder['pid']} on host "
            f"{holder['host']}, 2 processes, since {holder['since']}); wait for it to end, or choose another --out"]
        assert snapshot(str(tmp_path)) == before
        os.kill(holder["pid"], signal.SIGKILL)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.terminate()  # torchrun passes it on to its processes
            first.wait(timeout=60)
    assert json.load(open(out + ".lock"))["pid"] == holder["pid"]  # left behind by the kill
    code, stdout, stderr = run_case("train_sft.py", [*base, "--max-steps", "1"])
    assert code == 0, stderr[-2000:]
    assert f"--out {out}: the run that held it, `{holder['command']}` (process {holder['pid']}" in stdout
    assert "is gone (killed?); taking its lock over" in stdout
    assert os.path.isfile(os.path.join(out, "train_config.json")) and not os.path.exists(out + ".lock")
