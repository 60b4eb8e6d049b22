"""--report-to: the trainers' metrics sent to an experiment tracker as well as to metrics.jsonl, under the names
TRL's trainers give them (transformers' Trainer prefixes train/ and eval/), so curves of a wlt run and of a TRL
run sit side by side. Optional: the tracker's package is needed only when it is asked for.

    tensorboard   event files in OUT/tensorboard/ (the tensorboard package; `tensorboard --logdir OUT`)
    wandb         a Weights & Biases run named after OUT, project $WANDB_PROJECT (default "wlt"); the wandb
                  package, logged in (`wandb login` or WANDB_API_KEY)
"""
from __future__ import annotations

import os

from lib.console import WltError

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def trl_names(row: dict) -> dict:
    """A metrics.jsonl row under TRL's names: eval/* as they are, lr as train/learning_rate, the rest under
    train/ (train/loss, train/rewards/chosen, train/logps/rejected, train/grad_norm, ...); the step is the x axis."""
    out = {}
    for k, v in row.items():
        if k == "step" or not isinstance(v, (int, float)):
            continue
        if k.startswith("eval/"):
            out[k] = v
        else:
            out["train/" + {"lr": "learning_rate", "tokens/s": "tokens_per_second"}.get(k, k)] = v
    return out


def _import(kind: str):
    """The tracker's module, or a one-line error naming the package to install."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        import wandb
        return wandb
    except ImportError:
        raise WltError(f"--report-to {kind}: the {PACKAGE[kind]} package is not installed; `pip install "
                           f"{PACKAGE[kind]}`, or leave --report-to out (metrics.jsonl has every metric)") from None


def require(kind: str) -> None:
    """Check, before any training time is spent, that the tracker asked for can be used."""
    if kind != "none":
        _import(kind)


class Tracker:
    """Sends each metrics row to the tracker (rank 0 only: the rows are already averaged over every rank)."""

    def __init__(self, kind: str, out_dir: str, config: dict):
        self.kind = kind
        if kind == "tensorboard":
            self.writer = _import(kind)(log_dir=os.path.join(out_dir, "tensorboard"))
        else:
            wandb = _import(kind)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "wlt"), name=os.path.basename(
                os.path.abspath(out_dir)), dir=out_dir, config=config)

    def log(self, row: dict) -> None:
        names = trl_names(row)
        if self.kind == "tensorboard":
            for k, v in names.items():
                self.writer.add_scalar(k, v, row["step"])
        else:
            self.run.log(names, step=row["step"])

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.run.finish()
