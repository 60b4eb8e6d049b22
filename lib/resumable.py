"""label.py's and evaluate.py's work: fixed batches dealt out to the processes, every finished batch kept on
disk as it is made, so that a killed run, rerun with the same command, computes only what is missing and ends
with the output of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil

from lib.console import log, progress, rank, world_size
from lib.dist import barrier, gather_dicts
from lib.files import read_json, write_json

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
                same = read_json(meta) == settings
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                shutil.rmtree(self.dir, ignore_errors=True)
                os.makedirs(self.dir)
                write_json(meta, settings)
        barrier()
        self.done = {}
        for fn in sorted(os.listdir(self.dir)):
            if fn.startswith("rank-") and fn.endswith(".jsonl"):
                with open(os.path.join(self.dir, fn), encoding="utf-8") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                            self.done[rec["k"]] = rec["v"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            continue
        barrier()  # every rank has read the files before any rank appends to them
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

    def add(self, key: str, value) -> None:
        self.f.write(json.dumps({"k": key, "v": value}) + "\n")
        self.f.flush()

    def remove(self) -> None:
        self.f.close()
        barrier()
        if rank() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


def in_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 in batches of similar length, longest first (less padding). Fixed by the
    data alone, so the work, and every number in it, is the same for any number of processes and across a
    resumed run."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + size] for s in range(0, len(order), size)]


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
