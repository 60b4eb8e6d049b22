"""The command line of `python wlt.py prepare|estimate` (wlt.py's __main__ hands off to main() here)."""
from __future__ import annotations

import argparse

from lib import estimate, prepare
from lib.console import HelpFormatter, check_ranges
from lib.signals import run_main


def main() -> None:
    run_main(cli)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wlt.py", description="prepare a run, or estimate a training run's memory")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ap.prepare_parser = sub.add_parser("prepare", help="materialise a run's data splits (data/*.jsonl) and config.json",
                                       description=prepare.__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    prepare.add_arguments(ap.prepare_parser)
    estimate.add_arguments(sub.add_parser("estimate", help="expected memory per device of a training run (weights, "
                                                           "gradients, optimizer, activations), before launching it",
                                          description=estimate.__doc__.split("\n\n")[0], formatter_class=HelpFormatter))
    return ap


def cli() -> None:
    """Parse `wlt.py prepare|estimate ...` and run it (errors propagate; main() turns them into one line)."""
    ap = build_parser()
    args = ap.parse_args()
    if args.cmd == "prepare":
        check_ranges(ap.prepare_parser, args, beta="> 0", labeled_fraction="in (0, 1)", test_fraction="in [0, 1)",
                     max_len=">= 1", num_pairs=">= 1", num_test=">= 1", tau="> 0")
        prepare.prepare(args)
    else:
        estimate.estimate_cli(args)
