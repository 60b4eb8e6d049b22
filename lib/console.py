"""What a user sees: messages from the first process only, one-line errors, progress bars, --help."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

import wlt


def rank() -> int:
    """This process's global rank under torchrun (0 in a plain `python` run)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def log(*args) -> None:
    """Print on global rank 0 only (every rank runs the same script under torchrun)."""
    if rank() == 0:
        print(*args, flush=True)


def one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line (library errors often span several), shortened to `limit`."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + " ..."


# ----------------------------------------------------------------------------------------------------------
# signals: Ctrl-C (SIGINT), and SIGTERM / SIGHUP (a scheduler's stop, a closed terminal), end a script with one
# line. Each becomes an exception in the main thread, so every `finally` runs and every temporary file is
# removed on the way out; what a killed run finished stays for the rerun (--resume, OUT.partial/).

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
# a scheduler's notice (SIGTERM before the kill; SIGUSR1 ahead of the time limit with SLURM's --signal=USR1@SECS):
# inside a trainer's loop it asks for a checkpoint at the next step boundary (save_on_signal), then the stop
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(BaseException):
    """A stop signal, raised in the main thread where the script was (a BaseException, like KeyboardInterrupt,
    so that `except Exception` does not swallow it). The hook for work to do on a signal, such as a checkpoint
    before a cluster's SIGTERM deadline: catch it around the loop, save, and raise it again."""

    def __init__(self, signum: int, saved: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved  # saved: what was written before the stop (a checkpoint)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_held():
    """Hold the stop signals until the block ends, then act on the first one that came: for the few renames
    that swap a finished output in, which must not be cut between two of them."""
    came = []
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if came:
        raise Interrupted(came[0])


class save_on_signal:
    """While entered, SIGTERM and SIGUSR1 do not stop the script where it is: they are recorded (`came`), for a
    training loop to save a checkpoint at its next step boundary and then stop (a signal mid-step must not
    save a half-updated state). Ctrl-C and SIGHUP still stop at once. Leaving puts the previous handlers back."""

    def __init__(self):
        self.came, self.old = None, {}

    def _record(self, signum, frame):
        if self.came is None:
            self.came = signum

    def __enter__(self):
        self.old = {s: signal.signal(s, self._record) for s in SAVE_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.old = {}
        return False


def run_main(main) -> None:
    """Run a script's main(); a wlt.WltError becomes a one-line message and exit code 1, a stop signal
    (Ctrl-C, SIGTERM, SIGHUP) one line and exit code 128 + its number."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    try:
        if not sys.stderr.isatty():  # the libraries' own bars (loading weights) are a terminal's, not a log file's
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            # datasets reads this when it is imported (only the hub and parquet sources import it): said here, it
            # costs nothing to the runs that never need it (importing datasets takes about half a second)
            os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        main()
    except wlt.WltError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
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
    _leave_process_group()


def check_ranges(ap: argparse.ArgumentParser, args: argparse.Namespace, **rules: str) -> None:
    """An argparse error naming the first flag out of its range. rules: flag (as its dest) -> one of RANGES;
    an unset flag (None) is not checked."""
    for name, rule in rules.items():
        value = getattr(args, name, None)
        if value is not None and not RANGES[rule](value):  # NaN fails every comparison
            ap.error(f"argument --{name.replace('_', '-')}: must be {rule}, got {value}")


RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1,
          "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1)": lambda v: 0 < v < 1,
          "in [0, 0.5)": lambda v: 0 <= v < 0.5}


def _leave_process_group() -> None:
    """End a finished multi-process run: wait until every rank is done, then leave without the C++ teardown.
    Left to that teardown (destroying the process group explicitly or at interpreter exit), a rank of a
    finished, successful gloo run occasionally aborts with "terminate called without an active exception"
    (exit code -6; seen in CI and in the test suite, too rarely to reproduce on demand), and torchrun then
    reports the whole run as failed. Every output file is complete and closed when main() returns, so after
    the barrier there is nothing left to do but flush the console and exit."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class HelpFormatter(argparse.HelpFormatter):
    """--help lists each flag with its default once: appended as "(default: X)" unless the help text already
    says what the default is, and left out for flags that are off or unset by default."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in (argparse.SUPPRESS, [])
        if "default" in text or unset or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def argument_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as the description, HelpFormatter for the flags."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], formatter_class=HelpFormatter)


def _duration(seconds: float) -> str:
    """A time left as a log line shows it: seconds, minutes, or hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _PlainProgress:
    """Progress for a log file, nohup or CI (stderr is not a terminal): one line at the start, then one at each
    tenth of the work (with the rate so far and the time left at that rate) and at the end, instead of a
    carriage-return update many times a second."""

    def __init__(self, total: int, desc: str, unit: str, initial: int):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.start, self.t0, self.postfix = initial, time.time(), ""
        self.next_tenth = self._tenth(initial) + 1
        print(f"{desc}: {initial}/{total} {unit}", file=sys.stderr, flush=True)

    def _tenth(self, n: int) -> int:
        return 10 * n // max(1, self.total)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tenth(self.n) >= self.next_tenth and self.n < self.total:
            self.next_tenth = self._tenth(self.n) + 1
            self._line()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def _line(self) -> None:
        dt = time.time() - self.t0
        rate = (self.n - self.start) / dt if dt > 0 else 0.0
        left = f", {_duration((self.total - self.n) / rate)} left" if 0 < rate and self.n < self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // max(1, self.total)}%), "
              f"{dt:.0f} s, {rate:.3g} {self.unit}/s{left}" + (f", {self.postfix}" if self.postfix else ""),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.total:
            self._line()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str = "it", initial: int = 0):
    """A progress bar on rank 0 (update, set_postfix, close): tqdm on a terminal, a few plain lines elsewhere,
    nothing on the other ranks."""
    if rank() != 0:
        return _NoProgress()
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=0.5)
    return _PlainProgress(total, desc, unit, initial)
