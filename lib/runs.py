"""The run folder (runs/NAME): its config.json, where each stage reads and writes, and what must be finished
before a stage may start. Every script takes `--run-dir runs/NAME` (default: runs/synthetic, launch.sh's
offline world, prepared on first use) or explicit paths.

    runs/NAME/config.json                 every setting of the run (`python wlt.py prepare`)
    runs/NAME/data/labeled.jsonl          D_l        unlabeled.jsonl  D_u (human order)   test.jsonl
    runs/NAME/teacher/sft/, teacher/dpo/  the weak teacher's reference and pi_w
    runs/NAME/data/weak.jsonl             D_u in the teacher's order (label.py)
    runs/NAME/student/sft/, student/dpo-weak/, student/dpo-human/
    runs/NAME/eval/                       results.md, results.json, generations.jsonl
"""
from __future__ import annotations

import json
import os

from lib import dist, prepare
from lib.console import WltError, log, one_line
from lib.dist import rank
from lib.files import read_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUN = os.path.join(REPO, "runs", "synthetic")  # launch.sh's default run, wherever a script is started

# Each stage's output in a run folder: the file that marks it finished (written last), what it is, and the
# command that makes it.
STAGES = {
    "prepare": ("config.json", "no prepared run", "python wlt.py prepare --data synthetic --out {run}"),
    "teacher/sft": ("teacher/sft/train_config.json", "no finished training of the teacher's SFT",
                    "torchrun train_sft.py --teacher{at}"),
    "teacher/dpo": ("teacher/dpo/train_config.json", "no finished training of the teacher's DPO",
                    "torchrun train_dpo.py --teacher{at}"),
    "weak labels": ("data/weak.summary.json", "no finished weak labels", "torchrun label.py --teacher{at}"),
    "student/sft": ("student/sft/train_config.json", "no finished training of the student's SFT",
                    "torchrun train_sft.py --student{at}"),
}


def shown(path: str) -> str:
    """A path as a message shows it: relative to the current folder when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def stage_command(run: str, stage: str) -> str:
    at = "" if os.path.abspath(run) == DEFAULT_RUN else f" --run-dir {shown(run)}"
    return STAGES[stage][2].format(run=shown(run), at=at)


def finished(run: str, stage: str) -> bool:
    return os.path.isfile(os.path.join(run, STAGES[stage][0]))


def require(run: str, stage: str) -> None:
    """Stop with one line naming the command to run first, unless `stage` of the run is finished."""
    if not finished(run, stage):
        marker, what, _ = STAGES[stage]
        raise WltError(f"{shown(run)}: {what} (no {marker}); run `{stage_command(run, stage)}` first")


def prepare_if_default(run: str, timeout_min: float = dist.DIST_TIMEOUT_MIN) -> None:
    """The default run is launch.sh's offline world: the scripts prepare it on first use, with the settings
    launch.sh uses, so that launch.sh later finds it prepared. Any other run folder must be prepared explicitly
    (`python wlt.py prepare`): nothing happens here for it."""
    if os.path.abspath(run) != DEFAULT_RUN:
        return
    dist.init_distributed(timeout_min)  # every rank, whatever it sees: rank 0 alone looks and prepares
    if rank() == 0 and not finished(DEFAULT_RUN, "prepare"):
        log(f"{shown(DEFAULT_RUN)}: preparing the default synthetic world (first use)")
        prepare.prepare(prepare.parse_args(["--data", "synthetic", "--out", DEFAULT_RUN]))
    dist.barrier()


def read_run_config(run: str) -> dict:
    """runs/NAME/config.json, as `wlt.py prepare` wrote it (a clear error when it is missing or broken)."""
    require(run, "prepare")
    path = os.path.join(run, "config.json")
    try:
        cfg = read_json(path)
    except json.JSONDecodeError as e:
        raise WltError(f"{path}: not a run config made by `wlt.py prepare` ({one_line(e)})") from None
    if not isinstance(cfg, dict):
        raise WltError(f"{path}: not a run config made by `wlt.py prepare`")
    return cfg


def run_defaults(run: str, script: str, role: str) -> dict:
    """A stage's defaults from runs/NAME/config.json (explicit flags override them)."""
    cfg = read_run_config(run)
    try:
        return dict(cfg["train"][script].get(role, {}))
    except (KeyError, TypeError, AttributeError) as e:
        raise WltError(f"{os.path.join(run, 'config.json')}: not a run config made by `wlt.py prepare` "
                           f"({one_line(e)})") from None


def summary_path(out: str) -> str:
    """label.py's summary beside its output (OUT.jsonl -> OUT.summary.json), written last: its completion marker."""
    return (out[:-len(".jsonl")] if out.endswith(".jsonl") else out) + ".summary.json"


# The stage that makes each path a trainer reads from a run folder.
MADE_BY = {"teacher/sft": "teacher/sft", "teacher/dpo": "teacher/dpo", "data/weak.jsonl": "weak labels",
           "student/sft": "student/sft"}


def role_paths(run: str, paths: tuple, given: dict) -> dict:
    """model, data and out of a trainer's role: `paths` = (model, data, out) relative to the run folder, as the
    script's ROLES table gives them (model None: the run's base model, from config.json). `given` holds the
    paths the user gave explicitly, which win. What the role reads from the run must be finished (else: the
    command to run first)."""
    out = {}
    for key, rel in zip(("model", "data", "out"), paths):
        if rel is None:
            continue
        out[key] = os.path.join(run, *rel.split("/"))
        if key != "out" and rel in MADE_BY and given.get(key) is None:
            require(run, MADE_BY[rel])
    return out
