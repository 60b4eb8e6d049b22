"""Files: written whole or not at all (write to a temporary name, then rename), JSON lines read with
file:line errors, and the fingerprints that tell whether an input changed since a stage last ran."""
from __future__ import annotations

import gzip
import json
import os
import shutil

from lib.console import WltError


def atomic_write(path: str, write_fn) -> None:
    """Write a file through `write_fn(tmp_path)` then rename, so a reader never sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def dump_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: dump_text(tmp, text))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def dump_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_jsonl(path: str, rows) -> None:
    atomic_write(path, lambda tmp: dump_jsonl(tmp, rows))


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _lines(path: str):
    """(line number, text) of a file, decoded line by line: an invalid byte is an error naming file:line, a
    damaged .gz file an error naming the file."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            for i, raw in enumerate(f, 1):
                try:
                    yield i, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise WltError(f"{path}:{i}: not valid UTF-8 (byte {e.start + 1} of the line); save the "
                                       f"file as UTF-8") from None
    except (OSError, EOFError) as e:  # gzip's BadGzipFile is an OSError; a cut .gz ends in EOFError
        raise WltError(f"{path}: cannot be read ({' '.join(str(e).split()) or type(e).__name__})") from None


def check_file(path: str) -> None:
    """A one-line error unless `path` is a file: a folder given for a file, or a missing file."""
    if os.path.isdir(path):
        raise WltError(f"{path}: a folder, not a file; give a .jsonl file")
    if not os.path.isfile(path):
        raise WltError(f"{path}: no such file")


def iter_jsonl(path: str):
    """Yield (line_number, row) for each non-blank line; a malformed line is an error naming file:line."""
    check_file(path)
    for i, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WltError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise WltError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def appended_rows(path: str) -> list:
    """The rows of a JSON-lines file that a process appends to as it works (metrics.jsonl, OUT.partial/rank-N.jsonl),
    in order. A kill can cut its last line: that one (or any line that does not parse) is left out."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def remove_dir(path: str) -> None:
    """Delete a folder so that a kill half-way cannot leave a partial copy under its name: rename, then delete."""
    if os.path.isdir(path):
        trash = f"{path}.trash.{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def fingerprint(path: str | None):
    """What identifies an input without reading it: [name, size, mtime] of a file, or of every file in a model
    folder (a retrained upstream stage rewrites its files, so its fingerprint changes). A trainer's own
    bookkeeping in its folder (metrics.jsonl, mid-run checkpoint*/ folders) is left out."""
    if not path or not os.path.exists(path):
        return path  # a hub name, or nothing
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.basename(path), st.st_size, st.st_mtime_ns]
    out = []
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f != "metrics.jsonl" and not os.path.relpath(root, path).startswith("checkpoint"):
                st = os.stat(os.path.join(root, f))
                out.append([os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns])
    return out


def same_settings(marker: str, settings: dict, inputs: dict, ignore=("resume",)) -> bool:
    """True when a stage's completion marker (a JSON file with "args" and "inputs", written last) records the
    same settings (except `ignore`) and the same input fingerprints: the stage's output is current."""
    try:
        prev = read_json(marker)
    except (OSError, json.JSONDecodeError):
        return False
    return prev.get("inputs") == inputs and all(
        prev.get("args", {}).get(k) == v for k, v in settings.items() if k not in ignore)


# how the inputs a stage records are named in a message (evaluate.py's are not flags of one name)
INPUT_NAMES = {"policies": "--policy", "weak": "the run's weak labels", "gold_rm": "--gold-rm"}


def what_changed(prev: dict, settings: dict, inputs: dict, ignore=("resume",), limit: int = 4) -> str:
    """The settings and inputs that differ from a record (a marker or a checkpoint's: {"args", "inputs"}), as a
    message names them: "--lr 0.001 -> 0.002, --data (its file changed)". At most `limit` of them, then how many
    more."""
    def shown(v) -> str:
        return v if isinstance(v, str) else json.dumps(v)
    was, had = prev.get("args") or {}, prev.get("inputs") or {}
    flags = [k for k, v in settings.items() if k not in ignore and was.get(k) != v]
    out = [f"--{k.replace('_', '-')} {shown(was.get(k))} -> {shown(settings[k])}" for k in flags]
    out += [f"{INPUT_NAMES.get(k, '--' + k)} (its files changed)" for k, v in inputs.items()
            if had.get(k) != v and k not in flags]  # a path given anew is said once, above
    if not out:
        return "nothing named"
    return ", ".join(out[:limit]) + (f" and {len(out) - limit} more" if len(out) > limit else "")
