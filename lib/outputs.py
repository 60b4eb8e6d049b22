"""What a script may do to its output path, so that no run costs the user a file:

    check_apart        an output that resolves to an input (or lies inside one, or holds one) is refused
    check_owner        a folder is written into only when it is absent, empty or an output of the same script
    swap_in            a trainer's final model, written whole into OUT.staging/ beside OUT, moved into OUT
    replace_files      label.py's and evaluate.py's results, written whole under temporary names, renamed
    Partial            label.py's and evaluate.py's finished batches, kept in OUT.partial/ as they are made, so that
    run_batches        a killed run, rerun with the same command, computes only what is missing

Every check here reads only; a script calls them all before it creates, moves or deletes anything.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

from lib.console import WltError, log, progress
from lib.dist import barrier, broadcast, gather_dicts, rank, world_size
from lib.files import appended_rows, read_json, remove_dir, what_changed, write_json
from lib.signals import signals_held

WRITTEN_BY = "written_by.json"  # {"script": "train_dpo.py"}: the trainer that owns the folder


def _inside(a: str, b: str) -> bool:
    """a is b, or lies below it (both resolved)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_apart(outputs: dict[str, str], inputs: dict[str, str | None]) -> None:
    """One line, before anything is read, when an output path resolves (symlinks and relative paths included)
    to an input, lies inside an input folder, or holds an input. outputs / inputs: what the user calls them
    (e.g. "--out") -> path; inputs that do not exist locally (hub names) are passed over."""
    for oname, out in outputs.items():
        o = os.path.realpath(out)
        for iname, path in inputs.items():
            if not path or not os.path.exists(path):
                continue
            i = os.path.realpath(path)
            if o == i:
                how = f"is {iname} itself"
            elif _inside(o, i):
                how = f"lies inside {iname} {path}"
            elif _inside(i, o):
                how = f"holds {iname} {path}"
            else:
                continue
            raise WltError(f"{oname} {out} {how}; writing there would change an input: choose another {oname}")


def trainer_folder_owner(out: str) -> str | None:
    """The trainer that owns folder `out` (its written_by.json, or the marker of a finished run), or None."""
    for name in (WRITTEN_BY, "train_config.json"):
        try:
            d = read_json(os.path.join(out, name))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and d.get("script"):
            return d["script"]
        if name == "train_config.json" and isinstance(d, dict) and isinstance(d.get("args"), dict):
            return "train_dpo.py" if "beta" in d["args"] else "train_sft.py"  # written before "script" was
    return None


# a trainer's own folders inside --out, replaced whole by its runs: --overwrite never takes them from a folder
# that no trainer wrote
TRAINER_FOLDERS = ("adapter", "checkpoint", "checkpoint.old", "checkpoint.tmp")


def check_owner(out: str, script: str, overwrite: bool, ours=None, folders: tuple = ()) -> None:
    """Refuse, naming the folder, to write into `out` unless it is absent, empty, an output of `script`, or
    --overwrite was given. ours(out) -> bool decides the last (default: a trainer's written_by.json). --overwrite
    writes the script's files into a folder and leaves the rest alone, so it is refused, naming them, where
    the folder holds `folders` (those the script replaces whole) and is not an output of a script that made them."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise WltError(f"--out {out} is a file, not a folder: choose another --out")
    if not os.listdir(out):
        return
    owned = ours(out) if ours else trainer_folder_owner(out) == script
    if overwrite and folders and not trainer_folder_owner(out):
        theirs = [f"{os.path.join(out, d)}{os.sep}" for d in folders if os.path.lexists(os.path.join(out, d))]
        if theirs:
            raise WltError(f"--out {out}: --overwrite would replace {' and '.join(theirs)}, which no trainer wrote; "
                           f"move {'it' if len(theirs) == 1 else 'them'} out of the folder, or choose another --out")
    if not owned and not overwrite:
        raise WltError(f"--out {out}: a folder that is not empty and not an output of {script}; choose a new or "
                           f"empty folder, or pass --overwrite to write {script}'s files into it")


def claim(out: str, script: str) -> None:
    """Mark `out` as this script's (once: the file never changes afterwards, so it does not change the folder's
    fingerprint), and remove what an interrupted save left beside it."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, WRITTEN_BY)
    if not os.path.isfile(path):
        write_json(path, {"script": script})
    stage = staging(out)
    if os.path.isdir(stage) and not os.path.isfile(os.path.join(stage, "train_config.json")):
        remove_dir(stage)


def staging(out: str) -> str:
    return out.rstrip(os.sep) + ".staging"


def _previous_final(out: str, marker: str) -> set[str]:
    """The entries of the finished output in `out` (as its marker lists them; before markers listed them, the
    weights and the adapter)."""
    try:
        files = read_json(os.path.join(out, marker)).get("files")
    except (OSError, json.JSONDecodeError, AttributeError):
        files = None
    if isinstance(files, list):
        return set(files)
    return {os.path.basename(p) for p in glob.glob(os.path.join(out, "model*.safetensors*"))} | {"adapter"}


def swap_in(out: str, marker: str) -> None:
    """Move the complete output in OUT.staging/ (its marker written last) into OUT, signals held: the previous
    output's marker goes first (from here on the folder is not finished), then its entries that the new one
    does not have, then each new entry replaces the old one, and the new marker comes last. A SIGKILL in
    between leaves OUT unfinished and OUT.staging/ complete: finish_swap completes it at the next start."""
    stage = staging(out)
    with signals_held():
        os.makedirs(out, exist_ok=True)
        new = set(os.listdir(stage)) - {marker}
        old = _previous_final(out, marker) if os.path.isfile(os.path.join(out, marker)) else set()
        if os.path.isfile(os.path.join(out, marker)):
            os.remove(os.path.join(out, marker))
        for name in sorted(old - new):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                remove_dir(path)
            elif os.path.exists(path):
                os.remove(path)
        for name in sorted(new):
            dst = os.path.join(out, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                remove_dir(dst)
            os.replace(os.path.join(stage, name), dst)
        os.replace(os.path.join(stage, marker), os.path.join(out, marker))
        os.rmdir(stage)


def finish_swap(out: str, marker: str) -> None:
    """A complete OUT.staging/ (its marker there) is an output whose swap was cut by a kill: complete it."""
    if os.path.isfile(os.path.join(staging(out), marker)):
        swap_in(out, marker)


def replace_files(writes: list[tuple[str, object]], marker: str, marker_obj) -> None:
    """Write each (path, write_fn(tmp_path)) under a temporary name; only when all are whole, with signals
    held: remove the old marker, rename each into place, write the new marker (last: it marks them complete).
    The previous results stay whole and marked until then; a failure removes the temporary files."""
    tmps = []
    try:
        for path, write_fn in writes:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp.{os.getpid()}"
            tmps.append(tmp)
            write_fn(tmp)
        with signals_held():
            if os.path.isfile(marker):
                os.remove(marker)
            for (path, _), tmp in zip(writes, tmps):
                os.replace(tmp, path)
            write_json(marker, marker_obj)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------
# label.py's and evaluate.py's resumable work: fixed batches dealt out to the processes, every finished batch kept
# on disk as it is made, so that a killed run, rerun with the same command, ends with an uninterrupted run's output


class Partial:
    """Resumable partial results of label.py and evaluate.py: OUT.partial/ beside the output, holding meta.json
    (the settings and inputs the results belong to) and one append-only rank-N.jsonl per process of
    {"k": key, "v": value} lines, flushed as they are made. A rerun with the same settings reads every complete
    line back (a kill can only cut a file's last line, which is skipped) and computes only what is missing;
    other settings discard it. remove() after the final output is written."""

    def __init__(self, out: str, settings: dict):
        self.dir = out + ".partial"
        meta = os.path.join(self.dir, "meta.json")
        settings = json.loads(json.dumps(settings))  # the form it takes on disk
        if rank() == 0:
            try:
                prev = read_json(meta)
            except (OSError, json.JSONDecodeError):
                prev = None
            same = prev == settings
            if isinstance(prev, dict) and not same:
                log(f"{self.dir}: made with other settings or inputs ("
                    f"{what_changed(prev, settings.get('args', {}), settings.get('inputs', {}), ignore=())}); "
                    f"starting over")
            if not same:
                shutil.rmtree(self.dir, ignore_errors=True)
                os.makedirs(self.dir)
                write_json(meta, settings)
        # what is finished: rank 0 reads it and tells the others, so that every rank deals out the same work
        self.done = broadcast(self._read_done() if rank() == 0 else None)
        path = os.path.join(self.dir, f"rank-{rank()}.jsonl")
        if os.path.isfile(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
        else:
            cut = False
        self.f = open(path, "a", encoding="utf-8")
        if cut:  # the last line was cut by a kill: start a fresh line
            self.f.write("\n")
        if self.done:
            log(f"{self.dir}: resuming with {len(self.done)} finished piece(s) of work")

    def _read_done(self) -> dict:
        done = {}
        for fn in sorted(os.listdir(self.dir)):
            if fn.startswith("rank-") and fn.endswith(".jsonl"):
                done.update((rec["k"], rec["v"]) for rec in appended_rows(os.path.join(self.dir, fn))
                            if isinstance(rec, dict) and "k" in rec and "v" in rec)
        return done

    def add(self, key: str, value) -> None:
        self.f.write(json.dumps({"k": key, "v": value}) + "\n")
        self.f.flush()

    def remove(self) -> None:
        self.f.close()
        barrier()
        if rank() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


def run_batches(batches: list[list[int]], partial: Partial, fn, *args, tag: str, desc: str, unit: str) -> dict:
    """Run fn(batch, *args) -> {item: value} over the batches not yet in `partial`, dealt out to the ranks in
    turn (batch k of the remaining list to rank k mod W), recording each finished batch under "tag:k", with a
    progress bar of the items (desc, unit). The batches are fixed by the caller, so any number of processes and any interruption give the
    same values. Returns every item's value on rank 0 ({} on the other ranks)."""
    remaining = [k for k in range(len(batches)) if f"{tag}:{k}" not in partial.done]
    bar = progress(sum(map(len, batches)), desc, unit,
                   initial=sum(len(batches[k]) for k in range(len(batches)) if f"{tag}:{k}" in partial.done))
    res = {}
    for k in remaining[rank()::world_size()]:
        out = fn(batches[k], *args)
        partial.add(f"{tag}:{k}", [[i, v] for i, v in out.items()])
        res.update(out)
        bar.update(len(batches[k]) * world_size())
    bar.close()
    res = gather_dicts(res)
    if rank() == 0:
        for k in range(len(batches)):
            for i, v in partial.done.get(f"{tag}:{k}", []):
                res[int(i)] = v  # JSON keys come back as strings
    return res
