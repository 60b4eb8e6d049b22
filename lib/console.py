"""What a user sees: messages from the first process only, one-line errors, progress bars, --help."""
from __future__ import annotations

import argparse
import sys
import time

from lib.dist import rank


class WltError(Exception):
    """A user-facing error: the scripts print its message on one line and exit 1, without a traceback
    (lib/signals.py, run_main)."""


_warned: set = set()


def warn_once(key, msg: str) -> None:
    """Print a warning once per key, from the first process only."""
    if key not in _warned:
        _warned.add(key)
        log(f"warning: {msg}")


def log(*args) -> None:
    """Print on global rank 0 only (every rank runs the same script under torchrun)."""
    if rank() == 0:
        print(*args, flush=True)


def one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line (library errors often span several), shortened to `limit`."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + " ..."


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


# off a terminal, a progress line at least this often while work goes on: a long tenth must not look stuck
PLAIN_PROGRESS_EVERY_S = 30


class _PlainProgress:
    """Progress for a log file, nohup or CI (stderr is not a terminal): one line at the start, then one at each
    tenth of the work and at least every PLAIN_PROGRESS_EVERY_S seconds (with the rate so far and the time left at
    that rate), and one at the end, instead of a carriage-return update many times a second."""

    def __init__(self, total: int, desc: str, unit: str, initial: int):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.start, self.t0, self.postfix = initial, time.time(), ""
        self.next_tenth = self._tenth(initial) + 1
        self.last = time.monotonic()
        print(f"{desc}: {initial}/{total} {unit}", file=sys.stderr, flush=True)

    def _tenth(self, n: int) -> int:
        return 10 * n // max(1, self.total)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n < self.total and (self._tenth(self.n) >= self.next_tenth or
                                    time.monotonic() - self.last >= PLAIN_PROGRESS_EVERY_S):
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
        self.last = time.monotonic()

    def close(self) -> None:
        if self.total:
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(total: int, desc: str, unit: str = "it", initial: int = 0):
    """A progress bar on rank 0 (update, set_postfix, close): tqdm on a terminal, a few plain lines elsewhere,
    nothing on the other ranks."""
    if rank() != 0:
        return _NoProgress()
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=0.5)
    return _PlainProgress(total, desc, unit, initial)
