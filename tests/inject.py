"""Fault injection from outside the code under test: run a project script as `python SCRIPT ARGS` runs it, with
the process set to kill itself (SIGKILL: no cleanup, no flush) at an exact point of the library it calls.

    python tests/inject.py step:N[@RANK] SCRIPT ARGS...    just before the N-th optimizer update of this process
    python tests/inject.py batch:N[@RANK] SCRIPT ARGS...   just after label.py / evaluate.py record their N-th batch
    python tests/inject.py term:N[@RANK] SCRIPT ARGS...    just after the N-th optimizer update of this process,
        send SIGTERM to the parent process (torchrun, which passes it on to every rank, as on a cluster), and
        wait 1 s, so the signal has reached the ranks before the step ends
    python tests/inject.py slow:SECONDS[@RANK] SCRIPT ARGS...  every model this process loads takes SECONDS
        longer (lib.models.load_model sleeps first): a slow disk or hub under rank 0's full-model load
    python tests/inject.py skew:PATH[@RANK] SCRIPT ARGS...  this process sees PATH and every file below it
        modified a second later (os.stat): a node whose local copy of an input carries other times, so that its
        fingerprints differ from rank 0's
    python tests/inject.py deterministic SCRIPT ARGS...  torch.use_deterministic_algorithms(True) in every rank:
        an op that would sum in no fixed order on CUDA raises instead
    python tests/inject.py swap:N SCRIPT ARGS...           just before the N-th step of a trainer's final switch
        (lib.outputs.swap_in: each rename, the exchange of the two folders, the deletion of the previous output)

Points combine with commas (deterministic,step:5). RANK (default 0) is the torchrun rank that dies (or
signals, or is slow, or sees other files); the others run on. The project's scripts hold no test hooks: the
point is found through torch's global optimizer step hooks and by wrapping library functions (for swap:N, the
file operations that lib.outputs.swap_in calls: kill_in_swap, which a test can also use in a process of its own).

In-process (a script's main() called by a test): `with crash_before_update(N): ...` raises Crash just before
the N-th optimizer update of this process, through the same hook; the run stops there, as a killed one does."""
import contextlib
import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_call(n: int, act):
    """A hook that calls act() at its n-th call (the arguments a hook is given are not needed)."""
    calls = [0]

    def count(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            act()
    return count


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def term_parent():
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(1)


def kill_in_swap(n: int) -> None:
    """SIGKILL this process just before the n-th step of lib.outputs.swap_in (os.replace, os.rename,
    outputs._exchange, shutil.rmtree, counted while swap_in runs)."""
    import shutil
    from lib import outputs
    inside, before = [False], on_call(n, kill_self)

    def counted(fn):
        def step(*args, **kwargs):
            if inside[0]:
                before()
            return fn(*args, **kwargs)
        return step

    os.replace, os.rename, shutil.rmtree = counted(os.replace), counted(os.rename), counted(shutil.rmtree)
    outputs._exchange = counted(outputs._exchange)
    swap_in = outputs.swap_in

    def watched(*args, **kwargs):
        inside[0] = True
        try:
            return swap_in(*args, **kwargs)
        finally:
            inside[0] = False
    outputs.swap_in = watched


class Crash(Exception):
    """The injected crash of crash_before_update."""


@contextlib.contextmanager
def crash_before_update(n: int):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def crash():
        raise Crash(f"injected crash before optimizer update {n}")
    handle = register_optimizer_step_pre_hook(on_call(n, crash))
    try:
        yield
    finally:
        handle.remove()


def skew(path: str) -> None:
    """This process sees every file at or below PATH modified one second later than it was (os.stat)."""
    stat = os.stat

    class Skewed:
        def __init__(self, st):
            self.st = st
            self.st_mtime_ns, self.st_mtime = st.st_mtime_ns + 10 ** 9, st.st_mtime + 1

        def __getattr__(self, name):
            return getattr(self.st, name)

    def skewed(p, *args, **kwargs):
        st = stat(p, *args, **kwargs)
        q = os.path.abspath(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else ""
        return Skewed(st) if q == path or q.startswith(path.rstrip(os.sep) + os.sep) else st
    os.stat = skewed


def main() -> None:
    points, script, *argv = sys.argv[1:]
    sys.path.insert(0, ROOT)
    for point in points.split(","):
        inject(point)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def inject(point: str) -> None:
    kind, _, where = point.partition(":")
    n, _, rank = where.partition("@")
    if kind == "deterministic":  # every rank: no op may choose its own summation order (CUDA's atomics)
        import torch
        torch.use_deterministic_algorithms(True)
        return
    if os.environ.get("RANK", "0") == (rank or "0"):
        if kind == "step":
            from torch.optim.optimizer import register_optimizer_step_pre_hook
            register_optimizer_step_pre_hook(on_call(int(n), kill_self))
        elif kind == "term":
            from torch.optim.optimizer import register_optimizer_step_post_hook
            register_optimizer_step_post_hook(on_call(int(n), term_parent))
        elif kind == "batch":
            from lib import outputs
            add, after = outputs.Partial.add, on_call(int(n), kill_self)

            def add_then_count(self, key, value):
                add(self, key, value)
                after()
            outputs.Partial.add = add_then_count
        elif kind == "skew":
            skew(os.path.abspath(n))
        elif kind == "slow":
            from lib import models
            load = models.load_model

            def slow_load(*args, **kwargs):
                time.sleep(float(n))
                return load(*args, **kwargs)
            models.load_model = slow_load
        elif kind == "swap":
            kill_in_swap(int(n))
        else:
            raise SystemExit(f"inject.py: unknown point {point!r} (step:N, term:N, batch:N, slow:SECONDS, skew:PATH, "
                             f"deterministic, swap:N)")


if __name__ == "__main__":
    main()
