"""Stop signals, and how a script ends. Ctrl-C (SIGINT), SIGTERM and SIGHUP (a scheduler's stop, a closed
terminal) end a script with one line: each becomes an exception in the main thread, so every `finally` runs and
every temporary file is removed on the way out; what a killed run finished stays for the rerun (--resume,
OUT.partial/). Inside a trainer's loop SIGTERM and SIGUSR1 (a scheduler's notice) only ask for a checkpoint at
the step's end (SaveNotice)."""
from __future__ import annotations

import os
import signal
import sys

from lib.console import WltError
from lib.dist import leave_process_group, rank, timed_out

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
# a scheduler's notice (SIGTERM before the kill; SIGUSR1 ahead of the time limit with SLURM's --signal=USR1@SECS):
# inside a trainer's loop it asks for a checkpoint at the next step boundary (SaveNotice), then the stop
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(BaseException):
    """A stop signal, raised in the main thread where the script was (a BaseException, like KeyboardInterrupt,
    so that `except Exception` does not swallow it). saved: what was written before the stop (a checkpoint)."""

    def __init__(self, signum: int, saved: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


class signals_held:
    """Hold the stop signals until the block ends, then act on the first one that came: for the few renames
    that swap a finished output in, which must not be cut between two of them."""

    def __enter__(self):
        self.came = []
        self.old = {s: signal.signal(s, lambda signum, frame: self.came.append(signum)) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if self.came and exc[0] is None:
            raise Interrupted(self.came[0])
        return False


class SaveNotice:
    """While entered, SIGTERM and SIGUSR1 do not stop the script where it is: the first one is recorded in
    `came` (its number), for a training loop to save a checkpoint at its next step boundary and then stop (a
    signal mid-step must not save a half-updated state). Ctrl-C and SIGHUP still stop at once."""

    def __enter__(self):
        self.came = 0
        self.old = {s: signal.signal(s, self._record) for s in SAVE_SIGNALS}
        return self

    def _record(self, signum, frame):
        self.came = self.came or signum

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        return False


def run_main(main) -> None:
    """Run a script's main(): a WltError becomes a one-line message and exit code 1, a stop signal (Ctrl-C,
    SIGTERM, SIGHUP) one line and exit code 128 + its number; a finished multi-process run leaves its process
    group (dist.leave_process_group)."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    try:
        if not sys.stderr.isatty():  # the libraries' own bars (loading weights) are a terminal's, not a log file's
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            # datasets reads this when it is imported (only the hub and parquet sources import it): said here, it
            # costs nothing to the runs that never need it (importing datasets takes about half a second)
            os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        main()
    except WltError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except RuntimeError as e:
        if not timed_out(e):
            raise
        print(f"error: {timed_out(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if rank() == 0 and getattr(e, "saved", None):
            print(f"error: stopped by {signal.Signals(signum).name}; saved {e.saved}: rerun the same command with "
                  f"--resume to continue from there", file=sys.stderr, flush=True)
        elif rank() == 0:
            print(f"error: stopped by {signal.Signals(signum).name}; no output was left half-written: rerun the same "
                  f"command to continue (a trainer with --resume)", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:  # as they were (a caller in the same process, e.g. a test, keeps its own)
        for s, handler in previous.items():
            signal.signal(s, handler)
    leave_process_group()
