"""Peak host memory of one library call, measured from outside the code under test: run a project script as
`python SCRIPT ARGS` runs it, with MODULE.FUNCTION wrapped so that each call

    collects garbage, resets the process's peak resident set (Linux: writing 5 to /proc/self/clear_refs sets
    VmHWM, which getrusage's ru_maxrss reads, back to the current RSS), runs, and appends
    {"rank", "before_mib", "peak_mib", "delta_mib"} as a JSON line to OUT.rank-RANK.jsonl

    python tests/host_peak.py lib.checkpoint.load_checkpoint OUT SCRIPT ARGS...

The numbers include pages of files the call maps and reads (safetensors are read through mmap), as
ru_maxrss does."""
import gc
import importlib
import json
import os
import resource
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    target, out, script, *argv = sys.argv[1:]
    sys.path.insert(0, ROOT)
    mod_name, _, fn_name = target.rpartition(".")
    mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name)

    def measured(*args, **kwargs):
        gc.collect()
        reset_peak()
        before = rss_mib()
        res = fn(*args, **kwargs)
        peak = peak_mib()
        rank = os.environ.get("RANK", "0")
        with open(f"{out}.rank-{rank}.jsonl", "a") as f:
            f.write(json.dumps({"rank": int(rank), "before_mib": before, "peak_mib": peak,
                                "delta_mib": peak - before}) + "\n")
        return res
    setattr(mod, fn_name, measured)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
