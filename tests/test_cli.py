"""The command line as users type it: flags that torchrun passes through untouched, --help that names each
default once, progress that stays a few lines in a log file, and stages that refuse to start before their
input exists, naming the command to run first."""
import argparse
import io
import os
import re
import shutil
import sys

import pytest
from torch.distributed.run import get_args_parser

from conftest import ROOT, run_script

import evaluate
import label
import train_dpo
import train_sft
from lib import commands, console, runs, signals
from lib.console import WltError

TORCHRUN_SCRIPTS = {"train_sft.py": train_sft, "train_dpo.py": train_dpo, "label.py": label, "evaluate.py": evaluate}


def long_options(ap: argparse.ArgumentParser) -> list[str]:
    return [s for a in ap._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def all_parsers() -> list[argparse.ArgumentParser]:
    out = [m.build_parser() for m in TORCHRUN_SCRIPTS.values()]
    top = commands.build_parser()
    out += [p for a in top._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    return out


@pytest.mark.parametrize("script", sorted(TORCHRUN_SCRIPTS))
def test_no_script_flag_is_swallowed_by_torchrun(script):
    """torchrun's parser accepts abbreviations of its own options anywhere on the line: a script flag that is
    a prefix of one of them (`--run` of `--run-path`, `--no` of `--no-python`) never reaches the script."""
    torchrun = get_args_parser()
    theirs = [s for a in torchrun._actions for s in a.option_strings]
    for opt in long_options(TORCHRUN_SCRIPTS[script].build_parser()):
        clashes = [t for t in theirs if t.startswith(opt)]
        assert not clashes, f"{script} {opt} is an abbreviation of torchrun's {clashes}"
        for argv in ([opt, "x"], [opt + "=x"]):  # and torchrun really hands it over as typed
            assert torchrun.parse_args([script, *argv]).training_script_args == argv


def test_help_names_each_default_once():
    for ap in all_parsers():
        text = ap.format_help()
        for block in re.split(r"\n(?=  -)", text):  # one block per flag
            flag = block.split()[0]
            assert len(re.findall(r"\(default", block)) <= 1, f"{ap.prog} {flag}: {' '.join(block.split())}"
        for a in ap._actions:  # a flag with a real default says it
            if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS) and a.dest != "help":
                block = next(b for b in re.split(r"\n(?=  -)", text) if b.split()[0].rstrip(",") in a.option_strings)
                assert "default" in block.lower() or "paper:" in block, f"{ap.prog} {a.option_strings}: no default"


def test_progress_is_a_few_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    err = io.StringIO()  # not a tty, like a log file, nohup or CI
    monkeypatch.setattr(sys, "stderr", err)
    bar = console.progress(5000, "label", unit="pairs")
    for _ in range(5000):
        bar.update(1)
    bar.close()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert 2 <= len(lines) <= 12, lines
    assert lines[-1].startswith("label: 5000/5000 pairs (100%)")
    # each line between the first and the last says the time left at the rate so far; the last has none left
    assert all(re.search(r"pairs/s, \d+(\.\d)? (s|min|h) left$", x) for x in lines[1:-1]) and len(lines) > 2
    assert "left" not in lines[-1]
    assert [console._duration(s) for s in (59, 600, 9000)] == ["59 s", "10 min", "2.5 h"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("cli") / "run")
    run_script(os.path.join(ROOT, "wlt.py"), "prepare", "--data", "synthetic", "--out", run, "--num-pairs", "100",
               "--num-test", "10")
    return run


@pytest.mark.parametrize("script,argv,done,stage", [
    ("train_dpo.py", ["--teacher"], [], "teacher/sft"),
    ("label.py", ["--teacher"], ["teacher/sft"], "teacher/dpo"),
    ("train_dpo.py", ["--student", "--labels", "human"], [], "student/sft"),
    ("train_dpo.py", ["--student", "--labels", "weak"], ["student/sft"], "weak labels"),
])
def test_a_stage_before_its_input_names_the_command_to_run_first(prepared, tmp_path, script, argv, done, stage):
    run = str(tmp_path / "run")
    shutil.copytree(prepared, run)
    for finished in done:  # only these stages are finished (their markers are all a stage looks at first)
        marker = os.path.join(run, runs.STAGES[finished][0])
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write("{}")
    p = run_script(os.path.join(ROOT, script), *argv, "--run-dir", run, check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert f"run `{runs.stage_command(run, stage)}` first" in errors[0], errors[0]


def test_the_default_run_is_prepared_on_first_use_as_launch_sh_prepares_it(tmp_path, monkeypatch, capsys):
    """`torchrun train_sft.py --teacher` on a fresh clone: runs/synthetic does not exist yet, so it is prepared
    with launch.sh's settings; launch.sh's own prepare then finds nothing to do."""
    from lib import prepare
    run = str(tmp_path / "runs" / "synthetic")
    monkeypatch.setattr(runs, "DEFAULT_RUN", run)
    with pytest.raises(WltError, match="no prepared run"):  # reading a run's config never prepares it
        runs.read_run_config(run)
    assert not os.path.exists(run)
    runs.prepare_if_default(run)  # what the scripts call, visibly, before they read the default run
    cfg = runs.read_run_config(run)
    assert os.path.isfile(os.path.join(run, "data", "labeled.jsonl")) and cfg["source"] == "synthetic"
    assert os.path.isabs(cfg["teacher_model"]) and os.path.isdir(cfg["teacher_model"])
    with open(os.path.join(ROOT, "launch.sh")) as f:
        launch = f.read()
    assert 'PREP=(--data "$DATA" --out "$RUN" --seed "$SEED")' in launch and "SEED=${SEED:-22}" in launch
    capsys.readouterr()
    assert prepare.prepare(prepare.parse_args(["--data", "synthetic", "--out", run, "--seed", "22"])) is None
    assert "nothing to do" in capsys.readouterr().out


def test_scripts_start_without_the_datasets_package(monkeypatch):
    """A machine without `datasets` (a GPU image may lack it) runs every stage of the synthetic world: a
    script's start silences its progress bars only where it is installed."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: the branch that silences the bars
    ran = []
    signals.run_main(lambda: ran.append(True))
    assert ran == [True]


def test_a_model_the_hub_will_not_give_is_one_line_naming_what_to_do(monkeypatch):
    """A gated model without a login names HF_TOKEN and the login; a name not on the hub, and a model not cached
    while offline, say so; each on one line."""
    import types
    import transformers
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from lib import models
    reply = types.SimpleNamespace(headers={}, request=None)  # what the hub's errors read of an HTTP response

    def refuse(cause):
        def from_pretrained(path, **kw):
            try:
                raise cause
            except Exception as e:  # as transformers wraps the hub's errors
                raise OSError(f"{path} is a repository\nwith a long story") from e
        return from_pretrained
    # the tokenizer, and the config (the first thing a trainer reads of --model, for its positions)
    for cls, read in ((transformers.AutoTokenizer, models.load_tokenizer), (transformers.AutoConfig, models.positions)):
        for cause, words in ((GatedRepoError("403 gated", response=reply), ["a gated model", "HF_TOKEN", "hf auth login"]),
                             (RepositoryNotFoundError("404", response=reply), ["no such local folder", "HF_TOKEN"])):
            monkeypatch.setattr(cls, "from_pretrained", refuse(cause))
            with pytest.raises(WltError) as e:
                read("meta-llama/Llama-3.2-1B")
            assert str(e.value).startswith("meta-llama/Llama-3.2-1B: ") and "\n" not in str(e.value)
            assert all(w in str(e.value) for w in words), str(e.value)
        monkeypatch.undo()
    for read in (models.load_tokenizer, models.positions):  # the suite runs with HF_HUB_OFFLINE=1
        with pytest.raises(WltError, match="not in the local hub cache, and the hub cannot be reached"):
            read("nobody/not-cached-anywhere")
