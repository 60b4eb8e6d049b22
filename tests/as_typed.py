"""Run many command lines of the project's scripts in one Python process, each exactly as `python SCRIPT ARGS`
runs it (sys.argv set, the script executed as __main__, its exit code taken from SystemExit), and record what
each did to a folder: the files it changed, removed or added (by SHA-256 before and after). One process start
(~4 s of imports) instead of one per command line.

    python tests/as_typed.py CASES.json RESULTS.json

CASES.json: [{"script": "train_dpo.py", "argv": [...], "watch": FOLDER}, ...], run in order (a later case may
use what an earlier one wrote). RESULTS.json: one {"code", "stdout", "stderr", "changed", "added"} per case;
a Python exception other than SystemExit is recorded as code "traceback" with its text in stderr."""
import contextlib
import hashlib
import io
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(folder: str) -> dict:
    """relative path -> SHA-256 of every file below folder (symlinks by their target's name)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_case(script: str, argv: list[str]) -> tuple[object, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [script, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            code = "traceback"
            err.write(traceback.format_exc())
    return code, out.getvalue(), err.getvalue()


def main() -> None:
    cases_path, results_path = sys.argv[1:]
    sys.path.insert(0, ROOT)
    results = []
    for case in json.load(open(cases_path)):
        before = snapshot(case["watch"])
        code, out, err = run_case(case["script"], case["argv"])
        after = snapshot(case["watch"])
        results.append({"code": code, "stdout": out, "stderr": err,
                        "changed": sorted(k for k in before if after.get(k) != before[k]),
                        "added": sorted(k for k in after if k not in before)})
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
