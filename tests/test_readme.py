"""The commands the README and docs/ print, run as printed, in a scratch copy of the repository.

A fenced block whose info string starts with `sh` is a command block. Untagged blocks are run here, line by
line, exactly as written; tagged ones are listed as skipped with the tag's reason:
    ```sh ci               the test command itself: .ci/run runs exactly this line (checked here)
    ```sh needs-hub        downloads models or data from the Hugging Face hub (unreachable offline)
    ```sh needs-gpu        needs a CUDA GPU
    ```sh needs-hub,gpu    both
    ```sh long             takes longer than the suite's budget on 2 CPU cores: run by hand
Two adjustments keep the suite short, neither of which changes a command's text:
  - the venv setup in front of the quick start (`python3 -m venv .venv && pip install ...`) is not repeated:
    it must equal .ci/run's setup, which CI runs for real on a clean clone; the commands then find this
    interpreter's python, torchrun and bash launch.sh on PATH, as the venv would put them there;
  - the default run folder, runs/synthetic, is prepared first as a small synthetic world, with the same
    `wlt.py prepare` that launch.sh runs (PREPARE_ARGS), and launch.sh gets small step counts through its
    documented settings (SFT_ARGS, DPO_ARGS, EVAL_ARGS), so each stage runs a few steps.
"Step by step" runs under `torchrun --nproc_per_node 2`: the multi-process path the README promises.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from test_pipeline import skipped, stage_logs

SETUP = "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -r requirements.txt && "
SKIP_REASONS = {"ci": "the test suite itself; .ci/run runs exactly this command on a clean clone",
                "needs-hub": "needs the Hugging Face hub (offline here)",
                "needs-gpu": "needs a CUDA GPU",
                "needs-hub,gpu": "needs the Hugging Face hub and a CUDA GPU",
                "long": "longer than the suite's budget on 2 CPU cores: run by hand"}
SMALL_WORLD = "--num-pairs 200 --num-test 12"
SMALL_STEPS = {"PREPARE_ARGS": SMALL_WORLD,
               "SFT_ARGS": "--max-steps 2 --eval-pairs 8",
               "DPO_ARGS": "--max-steps 3 --eval-pairs 8",
               "EVAL_ARGS": "--max-new-tokens 8 --batch-size 12"}
TABLE_ROWS = ["| base model |", "| SFT (reference) |", "| pi_human (DPO, human labels) |", "| pi_weak (DPO, weak labels) |"]


def command_blocks() -> list[tuple[str, str, str]]:
    """(file, tag, text) of every ```sh block of README.md and docs/*.md."""
    files = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(ROOT, "docs")
    files += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
    out = []
    for path in files:
        text = open(path).read()
        for m in re.finditer(r"^```sh([^\n]*)\n(.*?)^```", text, re.M | re.S):
            out.append((os.path.relpath(path, ROOT), m.group(1).strip(), m.group(2)))
    return out


def commands(text: str) -> list[str]:
    """A block's command lines, without comments."""
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def scratch_copy(dest: str) -> str:
    """The repository's files as a fresh clone has them (tracked, or new and not ignored)."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in filter(None, names):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))
    return dest


def environment(**extra) -> dict:
    """The venv's bin folder first on PATH (python3, torchrun), offline, one thread per process."""
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1", **extra)


def sh(line: str, cwd: str, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"`{line}` failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "Warning" not in p.stderr, f"`{line}` printed a warning:\n{p.stderr[-3000:]}"
    return p


def prepare_small_world(repo: str, env: dict) -> None:
    sh(f"python3 wlt.py prepare --data synthetic --out runs/synthetic --seed 22 {SMALL_WORLD}", repo, env)


def assert_results_table(repo: str) -> None:
    with open(os.path.join(repo, "runs", "synthetic", "eval", "results.md")) as f:
        results = f.read()
    for row in TABLE_ROWS:
        assert row in results, results


def block(first_line: str) -> str:
    """The one untagged block of README.md whose first command is `first_line`."""
    found = [text for f, tag, text in command_blocks() if f == "README.md" and not tag and commands(text)[0] == first_line]
    assert len(found) == 1, f"README.md: expected one ```sh block starting with `{first_line}`, found {len(found)}"
    return found[0]


QUICK_START = SETUP + 'PATH="$PWD/.venv/bin:$PATH" bash launch.sh'
STEP_BY_STEP = "torchrun train_sft.py --teacher"
MULTI_PROCESS = "NPROC=2 bash launch.sh"
RUN_HERE = {QUICK_START, STEP_BY_STEP, MULTI_PROCESS}


@pytest.mark.parametrize("where,tag,text", command_blocks(),
                         ids=lambda x: x if isinstance(x, str) and "\n" not in x and len(x) < 40 else "")
def test_every_command_block_is_run_here_or_skipped_with_a_reason(where, tag, text):
    if tag == "ci":
        with open(os.path.join(ROOT, ".ci", "run")) as f:
            assert commands(text)[0] in f.read(), f"{where}: the test command differs from .ci/run's"
    if tag:
        assert tag in SKIP_REASONS, f"{where}: unknown command block tag {tag!r} (known: {sorted(SKIP_REASONS)})"
        pytest.skip(f"{where}: `{commands(text)[0]}`: {SKIP_REASONS[tag]}")
    assert where == "README.md" and commands(text)[0] in RUN_HERE, \
        f"{where}: command block `{commands(text)[0]}` is neither run by tests/test_readme.py nor tagged"


def test_quick_start_then_the_same_pipeline_on_two_processes(tmp_path):
    """The first command, then `NPROC=2 bash launch.sh` on the finished run: every stage's flags pass through
    torchrun, every stage finds its output finished, the table is printed again."""
    line, = commands(block(QUICK_START))
    assert line.startswith(SETUP), "README: the quick start must set up the venv as .ci/run does"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert SETUP.strip(" &") in f.read()
    repo = scratch_copy(str(tmp_path / "repo"))
    env = environment(**SMALL_STEPS)
    out = sh(line[len(SETUP):], repo, env).stdout
    assert "== done in" in out
    assert_results_table(repo)
    table = open(os.path.join(repo, "runs", "synthetic", "eval", "results.md")).read()
    line, = commands(block(MULTI_PROCESS))
    out = sh(line, repo, env).stdout
    assert skipped(stage_logs(out)) == set(range(1, 9)), out[-3000:]  # prepare, the five trainers, label, evaluate
    assert open(os.path.join(repo, "runs", "synthetic", "eval", "results.md")).read() == table


def test_step_by_step_on_two_processes(tmp_path):
    repo = scratch_copy(str(tmp_path / "repo"))
    env = environment()
    prepare_small_world(repo, env)
    lines = commands(block(STEP_BY_STEP))
    assert lines[0] == STEP_BY_STEP and len(lines) == 7 and all(x.startswith("torchrun ") for x in lines)
    for line in lines:
        sh(line.replace("torchrun ", "torchrun --nproc_per_node 2 ", 1), repo, env)
    run = os.path.join(repo, "runs", "synthetic")
    for stage in ("teacher/sft", "teacher/dpo", "student/sft", "student/dpo-weak", "student/dpo-human"):
        assert os.path.isfile(os.path.join(run, stage, "train_config.json")), stage
    assert os.path.isfile(os.path.join(run, "data", "weak.summary.json"))
    assert_results_table(repo)


def method_map() -> list[tuple[str, list[str], list[tuple[str, str]]]]:
    """(equation, [MODULE.NAME, ...], [(FILE, LINE), ...]) of each row of the README's method map."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text.split("<!-- method-map -->")[1].split("<!-- /method-map -->")[0]
    rows = [r.split("|")[1:-1] for r in table.strip().splitlines()[2:]]
    return [(r[0].strip(), re.findall(r"`(\w+\.\w+)`", r[2]), re.findall(r"`(\w+\.py):(\d+)`", r[3])) for r in rows]


def test_the_method_map_points_at_the_lines_that_define_each_function():
    """Each name the README's method map gives (wlt.NAME, or a script's, train_dpo.NAME) exists in that file, at
    the line the map gives; the equations come in the paper's order, as wlt.py's `# Eq. N` headings do."""
    def defined(path):  # name -> line of each function, class and top-level constant of a file
        src = open(os.path.join(ROOT, path)).read().splitlines()
        return {m.group(1) or m.group(2): i + 1 for i, line in enumerate(src)
                if (m := re.match(r"(?:def|class) (\w+)\b|([A-Z_]+) = ", line))}
    rows = method_map()
    assert len(rows) >= 8
    for eq, names, places in rows:
        assert names and len(names) == len(places), f"method map, {eq}: {names} vs {places}"
        for name, (path, line) in zip(names, places):
            module, _, attr = name.partition(".")
            assert path == module + ".py", f"method map, {eq}: {name} is not in {path}"
            where = defined(path)
            assert attr in where, f"method map, {eq}: {name} does not exist"
            assert int(line) == where[attr], f"method map, {eq}: {name} is at {path}:{where[attr]}, not {line}"
    src = open(os.path.join(ROOT, "wlt.py")).read().splitlines()
    in_map = [int(m.group(1)) for eq, _, _ in rows if (m := re.match(r"Eq\. (\d)", eq))]
    headings = [int(m.group(1)) for line in src if (m := re.match(r"# Eq\. (\d)", line))]
    assert in_map == sorted(in_map) and headings == [1, 2, 3, 4, 5, 6], (in_map, headings)


def test_the_readme_names_the_functions_label_py_calls():
    text = open(os.path.join(ROOT, "README.md")).read()
    said = re.search(r"label\.py computes the weak labels with (.*?)\.\s", text, re.S).group(1)
    label = open(os.path.join(ROOT, "label.py")).read()
    names = re.findall(r"`wlt\.(\w+)`", said)
    assert {"pair_logps", "implicit_reward", "prefers_first"} <= set(names)
    for name in names:
        assert f"wlt.{name}" in label, f"README says label.py calls wlt.{name}; it does not"
