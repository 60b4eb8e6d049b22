"""Never lose what the user has (docs/robustness.md, "Bad input and misuse"): each row of that table, typed as a
user types it, gives its message, and every file that existed before the command is byte-identical after it
(nothing added either). A finished stage rerun and interrupted by Ctrl-C at a random moment is still loadable
and marked finished; --resume then continues. A run folder cannot turn on trust_remote_code."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script

PAIRS = [{"prompt": f"Human: question {i}? Assistant:", "chosen": f" a good answer {i}.", "rejected": f" bad {i}"}
         for i in range(12)]
PAIRS[0] = dict(PAIRS[0], prompt="Human: a long question" + " and more" * 150 + "? Assistant:")  # > 128 tokens


def write_pairs(path: str, pairs=PAIRS) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return path


def evil_model(folder: str, model: str, sentinel: str) -> str:
    """A copy of `model` whose config.json points at Python code of its own (auto_map), which, if imported at
    all, writes `sentinel`."""
    shutil.copytree(model, folder)
    with open(os.path.join(folder, "evil_code.py"), "w") as f:
        f.write(f"open({sentinel!r}, 'w').write('imported')\n"
                "from transformers import GPT2Config as EvilConfig, GPT2LMHeadModel as EvilModel\n")
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    json.dump(cfg, open(cfg_path, "w"))
    return folder


def other_tokenizer_model(folder: str) -> str:
    """A tiny GPT-2 whose tokenizer is another BPE (400 tokens, not the suite's 300)."""
    import torch
    from transformers import AutoModelForCausalLM
    from conftest import make_bpe_tokenizer, tiny_config
    tok = make_bpe_tokenizer(400)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def swapped_ids_model(folder: str, model: str) -> str:
    """A copy of `model` whose tokenizer gives two tokens each other's ids: as many tokens, other text per id."""
    shutil.copytree(model, folder)
    path = os.path.join(folder, "tokenizer.json")
    tj = json.load(open(path))
    vocab = tj["model"]["vocab"]
    a, b = sorted((t for t, i in vocab.items() if i in (100, 101)), key=vocab.get)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(tj, open(path, "w"))
    return folder


def pickled_model(folder: str, model: str) -> str:
    """A copy of `model` whose weights are a pytorch_model.bin pickle that would call os.system when unpickled."""
    import torch
    from safetensors.torch import load_file

    class RunsCode:
        def __reduce__(self):
            return os.system, ("echo this pickle ran code",)
    shutil.copytree(model, folder)
    sd = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save({**sd, "extra": RunsCode()}, os.path.join(folder, "pytorch_model.bin"))
    return folder


def test_each_row_of_the_table(tmp_path, tiny_model_dir):
    """One process runs the setup (a finished SFT, DPO and labels on a GPT-2 with 128 positions) and then every
    row (tests/as_typed.py), each watched by hashing the whole folder before and after. Outputs in use are held
    by this test's process (the lock a run takes, outputs.locked) while the rows run."""
    from lib import outputs
    w = str(tmp_path / "w")
    os.makedirs(w)
    j = lambda *p: os.path.join(w, *p)  # noqa: E731
    model = shutil.copytree(tiny_model_dir("gpt2"), j("model"))
    data = write_pairs(j("pairs.jsonl"))
    with open(j("bad-utf8.jsonl"), "wb") as f:
        f.write((json.dumps(PAIRS[1]) + "\n").encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with open(j("bad-json.jsonl"), "w") as f:
        f.write(json.dumps(PAIRS[1]) + '\n{"prompt": "p", "chosen": "a"\n')
    os.makedirs(j("datadir"))
    os.makedirs(j("notes"))
    open(j("notes", "mine.txt"), "w").write("the user's own notes\n")
    open(j("notes.txt"), "w").write("the user's own file\n")
    damaged = shutil.copytree(model, j("damaged"))
    weights = os.path.join(damaged, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    os.symlink(model, j("link"))
    sentinel = str(tmp_path / "imported.txt")  # outside the watched folder
    evil = evil_model(j("evil"), model, sentinel)
    os.makedirs(j("run", "data"))
    write_pairs(j("run", "data", "labeled.jsonl"))
    json.dump({"source": "x.jsonl", "train": {"train_sft.py": {"teacher": {"model": evil, "trust_remote_code": True}}}},
              open(j("run", "config.json"), "w"))
    other = other_tokenizer_model(j("other"))
    swapped = swapped_ids_model(j("swapped"), model)
    pickled = pickled_model(j("pickled"), model)
    os.makedirs(j("run2"))
    json.dump({"source": "x.jsonl", "train": {"train_sft.py": {"teacher": {"model": model, "overwrite": True}}}},
              open(j("run2", "config.json"), "w"))
    for sub, name in (("adapter", "adapter_model.safetensors"), ("checkpoint", "state.pt")):  # the user's own
        os.makedirs(j("mine", sub))
        open(j("mine", sub, name), "w").write("the user's own\n")
    os.makedirs(j("killed"))  # what a trainer killed before its first checkpoint leaves
    json.dump({"script": "train_sft.py"}, open(j("killed", "written_by.json"), "w"))
    open(j("killed", "metrics.jsonl"), "w").write('{"step": 1, "loss": 5.0}\n')
    being_trained = shutil.copytree(model, j("model2"))
    json.dump({"host": "node-7", "boot": "another machine", "pid": 4242, "since": "2026-12-06 10:00:00",
               "processes": 8, "command": "train_sft.py --out far"}, open(j("far.lock"), "w"))  # a shared FS
    os.makedirs(j("elsewhere"))
    os.symlink(j("elsewhere"), j("outlink"))
    sft, dpo, weak, missing = j("sft"), j("dpo"), j("weak.jsonl"), j("goood.jsonl")
    small = ["--batch-size", "4", "--eval-pairs", "0", "--max-steps", "2"]
    S = ["--model", sft, "--data", data]  # train_dpo.py from the finished SFT
    L = ["--model", dpo, "--ref", sft]  # label.py with the finished teacher

    setup = [("train_sft.py", ["--model", model, "--data", data, "--out", sft, *small]),
             ("train_dpo.py", [*S, "--out", dpo, *small]),
             ("label.py", [*L, "--data", data, "--out", weak])]
    # (script, argv, exit code, message): the rows of docs/robustness.md's table, in its order
    rows = [
        ("train_dpo.py", [*S, "--out", j("o"), "--beta", "-1"], 2, "argument --beta: must be > 0, got -1.0"),
        ("train_dpo.py", [*S, "--out", j("o"), "--beta", "0"], 2, "argument --beta: must be > 0, got 0.0"),
        ("label.py", [*L, "--data", data, "--out", j("o.jsonl"), "--beta", "-1"], 2, "argument --beta: must be > 0"),
        ("train_dpo.py", [*S, "--out", j("o"), "--lr", "-0.001"], 2, "argument --lr: must be >= 0, got -0.001"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("o"), "--batch-size", "0"], 2,
         "argument --batch-size: must be >= 1, got 0"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("o"), "--micro-batch-size", "0"], 2,
         "argument --micro-batch-size: must be >= 1, got 0"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("o"), "--epochs", "0"], 2,
         "argument --epochs: must be >= 1, got 0"),
        ("label.py", [*L, "--data", data, "--out", j("o.jsonl"), "--batch-size", "0"], 2,
         "argument --batch-size: must be >= 1, got 0"),
        ("evaluate.py", ["--policy", f"a={dpo}", "--prompts", data, "--out", j("ev"), "--batch-size", "0"], 2,
         "argument --batch-size: must be >= 1, got 0"),
        ("label.py", [*L, "--data", data, "--out", data], 1, f"--out {data} is --data itself"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", model], 1, f"--out {model} is --model itself"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("link")], 1, f"--out {j('link')} is --model itself"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("model", "out")], 1, "lies inside --model"),
        ("evaluate.py", ["--policy", f"a={dpo}", "--prompts", data, "--gold-rm", model, "--out", dpo], 1,
         f"--out {dpo} is --policy a itself"),
        ("train_dpo.py", ["--model", sft, "--data", missing, "--out", dpo], 1, f"{missing}: no such file"),
        ("label.py", [*L, "--data", missing, "--out", weak], 1, f"{missing}: no such file"),
        ("label.py", ["--model", dpo, "--ref", j("nope"), "--data", data, "--out", weak], 1,
         f"{j('nope')}: no such model folder"),
        ("train_sft.py", ["--model", model, "--data", j("datadir"), "--out", j("o")], 1,
         f"{j('datadir')}: a folder, not a file"),
        ("train_sft.py", ["--model", model, "--data", j("bad-json.jsonl"), "--out", j("o")], 1,
         f"{j('bad-json.jsonl')}:2: not valid JSON"),
        ("train_dpo.py", [*S[:2], "--data", j("bad-json.jsonl"), "--out", j("o")], 1,
         f"{j('bad-json.jsonl')}:2: not valid JSON"),
        ("label.py", [*L, "--data", j("bad-json.jsonl"), "--out", j("o.jsonl")], 1,
         f"{j('bad-json.jsonl')}:2: not valid JSON"),
        ("train_dpo.py", [*S[:2], "--data", j("bad-utf8.jsonl"), "--out", j("o")], 1,
         f"{j('bad-utf8.jsonl')}:2: not valid UTF-8"),
        ("train_sft.py", ["--model", damaged, "--data", data, "--out", j("o")], 1,
         f"{weights}: damaged weights file"),
        ("train_dpo.py", [*S, "--out", j("notes")], 1, f"--out {j('notes')}: a folder that is not empty and not an "
                                                      f"output of train_dpo.py"),
        ("train_dpo.py", ["--model", model, "--data", data, "--out", sft], 1, "not an output of train_dpo.py"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("notes.txt")], 1, "is a file, not a folder"),
        ("label.py", [*L, "--data", data, "--out", j("notes.txt")], 1, "a file that is not label.py's output"),
        ("label.py", [*L, "--data", data, "--out", j("notes")], 1, "is a folder; label.py writes a .jsonl file"),
        ("evaluate.py", ["--policy", f"a={dpo}", "--prompts", data, "--gold-rm", model, "--out", j("notes")], 1,
         "not an output of evaluate.py"),
        ("train_dpo.py", [*S, "--out", dpo, *small], 0, "finished run with the same settings and inputs found; "
                                                        "nothing to do (--overwrite trains again)"),
        ("train_dpo.py", [*S, "--out", dpo, *small, "--lr", "1e-3"], 1,
         "holds a finished run of other settings or inputs (--lr 5e-05 -> 0.001); nothing done. Pass --overwrite"),
        ("label.py", [*L, "--data", data, "--out", weak], 0, "already labeled with the same settings and inputs"),
        ("train_sft.py", ["--teacher", "--run-dir", j("run")], 1,
         f"{j('run', 'config.json')}: sets trust_remote_code (train.train_sft.py.teacher); remove it"),
        ("train_dpo.py", [*S, "--ref", other, "--out", j("o")], 1,
         f"--model {sft} and --ref {other} have different tokenizers (300 vs 400 tokens)"),
        ("label.py", ["--model", dpo, "--ref", other, "--data", data, "--out", j("o.jsonl")], 1,
         f"--model {dpo} and --ref {other} have different tokenizers (300 vs 400 tokens)"),
        ("train_dpo.py", [*S, "--ref", swapped, "--out", j("o")], 1,
         f"--model {sft} and --ref {swapped} have different tokenizers (2 token(s) with other ids, e.g. "),
        ("label.py", ["--model", sft, "--ref", sft, "--data", data, "--out", j("o.jsonl")], 1,
         f"--model and --ref are the same model ({sft}): every reward beta*log(pi_w/pi_ref) would be 0 and every "
         f"label a tie; --model is the teacher trained with DPO, --ref the model it started from"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("busy")], 1,
         f"--out {j('busy')} is in use by another run: `"),
        ("label.py", [*L, "--data", data, "--out", j("busy.jsonl")], 1, f"--out {j('busy.jsonl')} is in use by "
                                                                          f"another run: `"),
        ("evaluate.py", ["--policy", f"a={dpo}", "--prompts", data, "--gold-rm", model, "--out", j("busy")], 1,
         f"--out {j('busy')} is in use by another run: `"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("far")], 1,
         f"--out {j('far')} is locked by `train_sft.py --out far` (process 4242 on host node-7, 8 processes, since "
         f"2026-12-06 10:00:00), which cannot be checked from host {socket.gethostname()}; if that run has ended, "
         f"remove {j('far.lock')} and run again"),
        ("train_dpo.py", ["--model", being_trained, "--data", data, "--out", j("o")], 1,
         f"--model {being_trained} is being written by another run: `"),
        ("train_dpo.py", ["--model", j("killed"), "--data", data, "--out", j("o")], 1,
         f"--model {j('killed')}: an unfinished output of train_sft.py (no train_config.json: its run stopped before "
         f"the end); rerun the command that trains {j('killed')} with --resume to finish it, or give a finished model"),
        ("evaluate.py", ["--policy", f"a={j('killed')}", "--prompts", data, "--gold-rm", model, "--out", j("ev")], 1,
         f"--policy a {j('killed')}: an unfinished output of train_sft.py"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("outlink")], 1,
         f"--out {j('outlink')} is a symbolic link; pass the folder it points to, {j('elsewhere')}"),
        ("train_sft.py", ["--model", model, "--data", data, "--out", j("notes.txt", "o")], 1,
         f"--out {j('notes.txt', 'o')}: {j('notes.txt')} is a file, not a folder; choose another --out"),
        ("label.py", [*L, "--data", data, "--out", j("notes.txt", "w.jsonl")], 1, f"{j('notes.txt')} is a file, not a "
                                                                                  f"folder"),
        ("evaluate.py", ["--policy", f"a={dpo}", "--prompts", data, "--gold-rm", model, "--out", j("notes.txt", "e")],
         1, f"{j('notes.txt')} is a file, not a folder"),
        ("train_sft.py", ["--model", pickled, "--data", data, "--out", j("o")], 1,
         f"{j('pickled', 'pytorch_model.bin')}: a pickle that holds more than weights (it calls posix.system), "
         f"refused unread"),
        ("train_sft.py", ["--teacher", "--run-dir", j("run2")], 1,
         f"{j('run2', 'config.json')}: sets overwrite (train.train_sft.py.teacher); remove it: only --overwrite on the "
         f"command line"),
        ("train_dpo.py", [*S, "--out", j("mine"), "--overwrite"], 1,
         f"--out {j('mine')}: --overwrite would replace {j('mine', 'adapter')}/ and {j('mine', 'checkpoint')}/, which "
         f"no trainer wrote; move them out of the folder, or choose another --out"),
    ]
    cases = [{"script": s, "argv": a, "watch": w} for s, a in setup] + \
            [{"script": s, "argv": a, "watch": w} for s, a, _, _ in rows]
    json.dump(cases, open(str(tmp_path / "cases.json"), "w"))
    with outputs.locked(j("busy")), outputs.locked(j("busy.jsonl")), outputs.locked(being_trained):
        run_script(os.path.join(ROOT, "tests", "as_typed.py"), str(tmp_path / "cases.json"),
                   str(tmp_path / "res.json"), env={"OMP_NUM_THREADS": "1"})
    assert [n for n in os.listdir(w) if n.endswith(".lock")] == ["far.lock"]  # every lock released; far's kept
    res = json.load(open(str(tmp_path / "res.json")))
    for r, (s, a) in zip(res, setup):
        assert r["code"] == 0, (s, r["stderr"][-2000:])
    # a pair longer than the model's 128 positions: --max-len (512 by default) capped with a message
    assert f"--max-len 512 is more than the 128 positions of --model {model}; using --max-len 128" in res[0]["stdout"]
    assert json.load(open(os.path.join(sft, "train_config.json")))["args"]["max_len"] == 128
    for r, (script, argv, code, message) in zip(res[len(setup):], rows):
        where = f"{script} {' '.join(argv)}"
        assert r["code"] == code, (where, r["stderr"][-2000:])
        assert "Traceback" not in r["stderr"], where
        said = r["stderr"] if code else r["stdout"]
        assert message in said, (where, said[-2000:])
        if code == 1:
            assert said.strip().splitlines() == [f"error: {said.strip()[7:]}"], (where, said)  # one line
        elif code == 2:
            assert said.strip().splitlines()[-1].startswith(f"{script}: error: "), (where, said)
        assert r["changed"] == [] and r["added"] == [], (where, r["changed"], r["added"])
    assert not os.path.exists(sentinel)  # nothing of the model folder's own code was imported
    # whether remote code was trusted is recorded in each output's settings
    assert json.load(open(os.path.join(dpo, "train_config.json")))["args"]["trust_remote_code"] is False
    assert json.load(open(j("weak.summary.json")))["args"]["trust_remote_code"] is False


def in_process(monkeypatch, script: str, argv: list[str]) -> None:
    """A trainer's main() in this process (no process start), as test_trainer_rules.py runs them."""
    import importlib
    monkeypatch.setattr(sys, "argv", [script, *argv])
    importlib.import_module(script[:-3]).main()


def test_interrupting_a_rerun_of_a_finished_stage(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A finished SFT output, trained again (--overwrite, other settings, a checkpoint every step) and stopped
    with SIGINT at a random moment: one line, and the output is whole and marked finished, the previous one or
    (when the run got to its end) the new one, never a mixture; no staging folder or temporary file is left.
    Then --resume continues the new run from its checkpoint and finishes it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    data = write_pairs(str(tmp_path / "pairs.jsonl"), PAIRS[1:])
    out = str(tmp_path / "sft")
    base = ["--model", tiny_model_dir("llama"), "--data", data, "--out", out, "--eval-pairs", "0", "--batch-size",
            "4", "--max-len", "64"]
    in_process(monkeypatch, "train_sft.py", [*base, "--max-steps", "1"])
    weights = load_file(os.path.join(out, "model.safetensors"))
    new = ["--lr", "1e-3", "--save-every", "1"]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py"), *base, *new, "--overwrite"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    p.stdout.readline()  # the first line: main() has started (its checks)
    delay = float(os.environ.get("WLT_SIGINT_AFTER", random.Random().uniform(0, 1.5)))  # its own generator: training seeds the global one
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate()
    outcome = f"SIGINT {delay:.2f} s after the first line: exit code {p.returncode}, {stderr.strip().splitlines()[-1:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    if p.returncode == -signal.SIGINT:  # at the interpreter's exit, after main() returned: the new run finished
        assert json.load(open(os.path.join(out, "train_config.json")))["args"]["lr"] == 1e-3
    elif p.returncode != 0:
        assert p.returncode == 128 + signal.SIGINT, (p.returncode, stderr[-3000:])
        errors = [x for x in stderr.splitlines() if x.startswith("error:")]
        assert errors == [stderr.strip().splitlines()[-1]] and "stopped by SIGINT" in errors[0], stderr[-3000:]
    cfg = json.load(open(os.path.join(out, "train_config.json")))  # marked finished
    now = load_file(os.path.join(out, "model.safetensors"))
    if cfg["args"]["lr"] != 1e-3:  # the previous output, untouched (else the new run had finished)
        assert now.keys() == weights.keys() and all((now[k] == weights[k]).all() for k in now)
    AutoModelForCausalLM.from_pretrained(out)  # loadable
    assert not os.path.exists(out + ".staging")
    # no temporary file (checkpoint.tmp/, a mid-run checkpoint cut while written, is never read as one)
    assert not [n for n in os.listdir(out) if ".tmp." in n], os.listdir(out)
    capsys.readouterr()
    in_process(monkeypatch, "train_sft.py", [*base, *new, "--resume"])
    said = capsys.readouterr().out
    assert json.load(open(os.path.join(out, "train_config.json")))["args"]["lr"] == 1e-3
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3]  # 11 pairs, batch 4: every step once
    assert "nothing to do" in said or "training again" in said, said
    print(outcome)  # shown by pytest -s or -rA (after capsys has read what the resumed run printed)


def test_held_signals_act_after_the_block():
    """A stop signal inside signals_held (the renames of a swap) is acted on once the block has ended."""
    from lib.signals import Interrupted, signals_held
    done = []
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted) as e:
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("the block ran to its end")
        assert done and e.value.signum == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, old)


def test_swap_in_replaces_only_the_final_output(tmp_path):
    """outputs.swap_in: the previous final output's entries (its marker's `files`) that the new one lacks go
    (a LoRA run's adapter/ after a full fine-tune), every new entry replaces the old one, and what is not part
    of a final output (the run's bookkeeping, a file of the user's) stays; a staged output whose swap was cut
    between two renames is completed by finish_swap."""
    from lib import outputs
    out, stage = str(tmp_path / "out"), str(tmp_path / "out.staging")

    def put(folder, files):
        for name, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            open(os.path.join(folder, name), "w").write(text)

    put(out, {"model.safetensors": "old", "config.json": "old", "adapter/adapter_model.safetensors": "old",
              "metrics.jsonl": "log", "notes.txt": "mine",
              "train_config.json": json.dumps({"files": ["adapter", "config.json", "model.safetensors"]})})
    put(stage, {"model.safetensors": "new", "config.json": "new", "train_config.json": json.dumps({"files": []})})
    outputs.finish_swap(out, "train_config.json")  # a complete staged output, as a kill before its swap leaves it
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "model.safetensors", "notes.txt",
                                       "train_config.json"]
    assert [open(os.path.join(out, n)).read() for n in ("model.safetensors", "config.json", "notes.txt")] == \
        ["new", "new", "mine"]
    assert not os.path.exists(stage)


def test_out_in_a_folder_that_cannot_be_written(tmp_path, tiny_model_dir, monkeypatch):
    """--out in a read-only folder: one line naming it, before any model or tokenizer is read, and nothing made.
    As root the kernel lets every write through, so there the folder refuses from outside the code as it refuses
    any other user (EACCES from os.open and os.mkdir below it)."""
    import errno
    import transformers
    from as_typed import run_case
    data = write_pairs(str(tmp_path / "pairs.jsonl"))
    ro, model = str(tmp_path / "ro"), tiny_model_dir("gpt2")
    os.makedirs(ro)
    os.chmod(ro, 0o555)
    if os.geteuid() == 0:
        def refuse(fn):
            def call(path, *args, **kwargs):
                if os.path.abspath(path).startswith(ro + os.sep):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
                return fn(path, *args, **kwargs)
            return call
        monkeypatch.setattr(os, "open", refuse(os.open))
        monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
    loads = []  # nothing of a model is read: its config, tokenizer or weights
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: loads.append(a) or 1 / 0)
    monkeypatch.chdir(tmp_path)
    for script, argv in (("train_sft.py", ["--model", model, "--data", data, "--out", "ro/sft"]),
                         ("train_dpo.py", ["--model", model, "--data", data, "--out", "ro/new/dpo"]),
                         ("label.py", ["--model", model, "--ref", tiny_model_dir("llama"), "--data", data, "--out",
                                       "ro/weak.jsonl"]),
                         ("evaluate.py", ["--policy", f"a={model}", "--prompts", data, "--gold-rm", model, "--out",
                                          "ro/eval"])):
        code, stdout, stderr = run_case(os.path.join(ROOT, script), argv)
        where = "ro/new" if "new" in argv[-1] else "ro"
        assert code == 1 and stderr.strip().splitlines() == [
            f"error: --out {argv[-1]}: " + (f"cannot create folder {where} (Permission denied); choose another --out"
                                            if "new" in argv[-1] else
                                            f"cannot write in {where} (Permission denied); choose a folder you can "
                                            f"write in")], (script, stderr)
    assert not loads and os.listdir(ro) == []
    os.chmod(ro, 0o755)


def test_resume_names_what_changed(tmp_path, tiny_model_dir, monkeypatch, capsys, one_thread):
    """--resume after a changed flag or input: the checkpoint it cannot use is named with what changed, before
    the run starts over; so is a finished output trained again, and label.py's partial results started over."""
    import inject
    import train_sft
    data = write_pairs(str(tmp_path / "pairs.jsonl"), PAIRS[1:])
    out = str(tmp_path / "sft")
    base = ["--model", tiny_model_dir("llama"), "--data", data, "--out", out, "--eval-pairs", "0", "--batch-size",
            "2", "--save-every", "1", "--max-steps", "4", "--lr", "1e-3"]
    with pytest.raises(inject.Crash), inject.crash_before_update(3):
        in_process(monkeypatch, "train_sft.py", base)
    capsys.readouterr()
    in_process(monkeypatch, "train_sft.py", [*base, "--lr", "2e-3", "--resume"])
    assert (f"{os.path.join(out, 'checkpoint')}: made with other settings or inputs (--lr 0.001 -> 0.002); "
            f"starting from step 0") in capsys.readouterr().out
    write_pairs(data, PAIRS[2:])
    in_process(monkeypatch, "train_sft.py", [*base, "--lr", "2e-3", "--resume", "--max-len", "64"])
    assert (f"{out}: settings or inputs changed since the finished run there (--max-len 128 -> 64, --data (its files "
            f"changed)); training again") in capsys.readouterr().out
    assert train_sft  # imported for in_process


def test_progress_in_a_log_file_every_30_seconds(tmp_path, tiny_model_dir, monkeypatch, one_thread):
    """Off a terminal (stderr to a file) a progress line comes at each tenth of the work and also once 30 s
    have passed since the last line: a run whose tenth takes long does not look stuck. The clock is advanced from
    outside (31 s per reading of lib.console's monotonic clock): a line at every step."""
    from as_typed import run_case
    from lib import console
    data = write_pairs(str(tmp_path / "pairs.jsonl"), PAIRS[1:])
    argv = ["--model", tiny_model_dir("llama"), "--data", data, "--eval-pairs", "0", "--batch-size", "1",
            "--epochs", "4", "--max-len", "64"]  # 44 steps: a tenth is 4.4 of them

    class Clock:
        now = 0.0

        @staticmethod
        def monotonic():
            Clock.now += 31
            return Clock.now
        time = staticmethod(time.time)

    monkeypatch.chdir(ROOT)
    lines = {}
    for clock in ("real", "slow"):
        if clock == "slow":
            monkeypatch.setattr(console, "time", Clock)
        code, _, stderr = run_case("train_sft.py", [*argv, "--out", str(tmp_path / clock)])
        assert code == 0, stderr[-2000:]
        lines[clock] = [x for x in stderr.splitlines() if x.startswith("sft: ")]
    assert len(lines["real"]) == 11  # the start, the 9 tenths before the last, the end
    assert [x.split()[1] for x in lines["slow"]] == [f"{k}/44" for k in range(45)]  # every step
