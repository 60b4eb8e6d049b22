"""What a script may do to its output path, so that no run costs the user a file:

    check_apart        an output that resolves to an input (or lies inside one, or holds one) is refused
    locked             one run per output: OUT.lock beside it, held from a script's start to its end
    check_owner        a folder is written into only when it is absent, empty or an output of the same script
    swap_in            a trainer's final model, written whole into OUT.staging/ beside OUT, switched in whole
    check_model_inputs a trainer's output read as a model is finished (a swap a kill cut is completed first)
    replace_files      label.py's and evaluate.py's results, written whole under temporary names, renamed
    Partial            label.py's and evaluate.py's finished batches, kept in OUT.partial/ as they are made, so that
    run_batches        a killed run, rerun with the same command, computes only what is missing

A script takes its output's lock first (the one file it writes before its checks, beside the output, removed on
the way out); the checks read only, and a script calls them all before it creates, moves or deletes anything.
check_model_inputs alone may complete, under that input's lock, the switch a kill cut: what the trainer's own
next start would do.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import shlex
import shutil
import socket
import sys
import time

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


# ----------------------------------------------------------------------------------------------------------
# one run per output. OUT.lock beside the output (a trainer's folder, label.py's file, evaluate.py's folder) is
# held from a script's start to its end: a second run on the same output is refused with one line. The file
# names the holder (host, process, command), and the holding process keeps an flock on it, which the kernel
# drops when the process dies, SIGKILL included: a lock whose process is gone is taken over with a word. On a
# file system that several machines share, a lock of another machine cannot be checked from here: it is refused
# with its host and process named, and the user removes the file once sure that run has ended.

_HELD: dict[str, tuple[int, list[str]]] = {}  # lock file -> (its descriptor, the folders made for it), this process


def lock_path(out: str) -> str:
    return out.rstrip(os.sep) + ".lock"


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat): with the pid, what tells a process from
    a later one that got the same pid. None where there is no /proc."""
    text = _read_text(f"/proc/{pid}/stat")
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (AttributeError, IndexError, ValueError):
        return None


def _me() -> dict:
    """This process as a lock names it: the machine (host name and boot: containers on one machine share the boot
    id and its flocks), the process, and the command that started it."""
    script, args = os.path.basename(sys.argv[0]), sys.argv[1:]
    return {"host": socket.gethostname(), "boot": _read_text("/proc/sys/kernel/random/boot_id"), "pid": os.getpid(),
            "started": _start_ticks(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "processes": world_size(), "command": shlex.join([script, *args])}


def _alive(holder: dict) -> bool:
    """Whether the holder (a process of this machine) still runs: its pid is there and started when it did."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return holder.get("started") is None or _start_ticks(pid) in (None, holder.get("started"))


def _who(holder: dict) -> str:
    runs = f", {holder['processes']} processes" if (holder.get("processes") or 1) > 1 else ""
    return (f"`{holder.get('command', '?')}` (process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            f"{runs}, since {holder.get('since', '?')})")


def _holder(fd: int) -> dict:
    try:
        d = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) and "pid" in d else {}


def _flock(fd: int, how: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no locks."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _make_parents(path: str, flag: str, out: str) -> list[str]:
    """Create the missing folders above `path` (a lock beside a new output); returns them, deepest first, for
    release to remove again when the run left nothing in them. One line when that cannot be: a file where a
    folder must be, or a folder this user cannot write in."""
    missing, d = [], os.path.dirname(os.path.normpath(path)) or "."  # as the user wrote it, for the message
    while not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d) or "."
    if not os.path.isdir(d):
        raise WltError(f"{flag} {out}: {d} is a file, not a folder; choose another {flag}")
    for m in reversed(missing):
        try:
            os.mkdir(m)
        except OSError as e:
            raise WltError(f"{flag} {out}: cannot create folder {m} ({e.strerror}); choose another {flag}") from None
    return missing


def _open_locked(path: str, flag: str, out: str) -> tuple[int, bool | None]:
    """Open the lock file at `path` (made if absent) and flock it: (its descriptor, True: locked; None: this file
    system has no locks). One line when another process holds it, or the folder cannot be written in."""
    for attempt in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WltError(f"{flag} {out}: cannot write in {os.path.dirname(lock_path(out)) or '.'} "
                           f"({e.strerror}); choose a folder you can write in") from None
        got = _flock(fd, fcntl.LOCK_EX)
        if got is False:  # held; give a moment to a reader that only looks (live_holder)
            holder = _holder(fd)
            os.close(fd)
            if attempt < 5:
                time.sleep(0.05)
                continue
            raise WltError(f"{flag} {out} is in use by another run: {_who(holder)}; wait for it to end, or choose "
                           f"another {flag}")
        try:  # the file locked must still be the one at the path (its holder may have removed it meanwhile)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, got
        except FileNotFoundError:
            pass
        os.close(fd)
    raise WltError(f"{flag} {out}: its lock {path} keeps changing; is another run starting on it?")


def _take(out: str, flag: str) -> None:
    """Take OUT.lock for this process (see above), or raise one line naming the run that holds it."""
    path = os.path.abspath(lock_path(out))
    if path in _HELD:  # this process has it already (a script's main() called again in one process)
        return
    made = [os.path.abspath(m) for m in _make_parents(lock_path(out), flag, out)]
    fd = None
    try:
        fd, got = _open_locked(path, flag, out)
        holder, me = _holder(fd), _me()
        if not holder and os.pread(fd, 4096, 0).strip():  # never write over a file of the user's
            raise WltError(f"{flag} {out}: {path} exists and is not a lock of this project's scripts; move it away "
                           f"or choose another {flag}")
        if holder:
            here = holder.get("boot") == me["boot"] and me["boot"] is not None
            rebooted = not here and holder.get("host") == me["host"] and holder.get("boot") is not None
            if not here and not rebooted:
                raise WltError(f"{flag} {out} is locked by {_who(holder)}, which cannot be checked from host "
                               f"{me['host']}; if that run has ended, remove {path} and run again")
            if here and got is None and _alive(holder):  # no flock here: the process itself tells
                raise WltError(f"{flag} {out} is in use by another run: {_who(holder)}; wait for it to end, or "
                               f"choose another {flag}")
            log(f"{flag} {out}: the run that held it, {_who(holder)}, is gone (killed?); taking its lock over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        _HELD[path] = (fd, made)
    except BaseException:
        if fd is not None:
            os.close(fd)
        for m in made:
            with contextlib.suppress(OSError):
                os.rmdir(m)
        raise


def on_rank_0(check, *args, **kwargs) -> None:
    """Run check(*args, **kwargs) on rank 0 only (a plain `python` run: here); every rank raises the one line it
    may raise, so that all stop or go on together (ranks that saw other files would otherwise part ways). Under
    torchrun every rank calls it, in a process group already joined (the script's init_distributed, with its
    --dist-timeout)."""
    err = None
    if rank() == 0:
        try:
            check(*args, **kwargs)
        except WltError as e:
            err = str(e)
    err = broadcast(err)
    if err:
        raise WltError(err)


def locked(out: str, flag: str = "--out"):
    """The output `out` for this run alone while the block runs (rank 0 takes the lock for the whole job): a
    second run is refused, a lock whose process is gone is taken over with a word, and the lock goes on every way
    out of the block (an error, a stop signal; a SIGKILL leaves it to be taken over). Taking it is the first
    write beside the output: a folder that cannot be written in is one line here, before anything is loaded."""
    return _holding(out, lambda: on_rank_0(_take, out, flag))


@contextlib.contextmanager
def _holding(out: str, take):
    """take() the lock of `out`, and release it when the block ends, unless this process held it already."""
    path = os.path.abspath(lock_path(out))
    mine = path in _HELD
    take()
    try:
        yield
    finally:
        if not mine and path in _HELD:
            _release(path)


def _release(path: str) -> None:
    """Remove a lock of this process (and the folders made only for it, when still empty). Removed before the
    descriptor is closed: a run waiting on the old file then finds it gone and locks a new one."""
    fd, made = _HELD.pop(path)
    with contextlib.suppress(OSError):
        os.remove(path)
    os.close(fd)
    for m in made:
        try:
            os.rmdir(m)
        except OSError:
            break


def live_holder(out: str) -> dict | None:
    """The run that holds `out`'s lock now (another process), or None. Looks without taking it."""
    path = os.path.abspath(lock_path(out))
    if path in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _holder(fd)
        got = _flock(fd, fcntl.LOCK_SH)
        if got is False:
            return holder or {"command": "?"}
        if got is None and holder.get("boot") == _me()["boot"] and _alive(holder):
            return holder
        return None
    finally:
        os.close(fd)  # closing drops the shared lock, if it was taken


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


# ----------------------------------------------------------------------------------------------------------
# a trainer's final output, switched in whole. It is written into OUT.staging/ beside OUT, its marker
# (train_config.json) last. Then, with stop signals held: the entries of OUT that are not part of its previous
# final output (metrics.jsonl, checkpoint/, ref_logps.safetensors, written_by.json, the user's own files) move
# into the new folder one rename each, while OUT still holds the previous output whole and marked; then one
# rename exchanges the two folders (Linux renameat2), so OUT is the old output whole or the new one whole at
# every moment. Where the file system cannot exchange (NFS, other systems), OUT goes to OUT.replaced and the new
# folder to OUT: a kill between those two leaves no OUT, which every stage that reads a model completes
# (check_model_inputs), as the trainer does at its next start (finish_swap). The previous output is deleted last.

def staging(out: str) -> str:
    return out.rstrip(os.sep) + ".staging"


def replaced(out: str) -> str:
    return out.rstrip(os.sep) + ".replaced"


def _marker(folder: str, marker: str) -> dict | None:
    try:
        d = read_json(os.path.join(folder, marker))
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else {}


def next_generation(out: str, marker: str) -> int:
    """The number the next final output of `out` carries in its marker: one more than the present one's. After the
    exchange the previous output sits in OUT.staging/ for a moment; its lower number tells it from a new one."""
    m = _marker(out, marker)
    return int(m.get("generation", 0)) + 1 if m is not None else 1


def _previous_final(out: str, marker: str) -> set[str]:
    """The entries of the finished output in `out` (as its marker lists them; before markers listed them, the
    weights and the adapter), its marker included; none when `out` holds no finished output."""
    m = _marker(out, marker)
    if m is None:
        return set()
    files = m.get("files")
    if isinstance(files, list):
        return set(files) | {marker}
    return {os.path.basename(p) for p in glob.glob(os.path.join(out, "model*.safetensors*"))} | {"adapter", marker}


def _exchange(a: str, b: str) -> bool:
    """Exchange two folders in one step (Linux renameat2 with RENAME_EXCHANGE). False where the system or the
    file system cannot (then nothing happened)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    if fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV):
        return False
    raise OSError(e, os.strerror(e), a)


def swap_in(out: str, marker: str) -> None:
    """Switch the complete output in OUT.staging/ (its marker written last) in for OUT's, signals held (see above).
    Also completes a switch that a kill cut at any step (finish_swap calls it then)."""
    stage, old = staging(out), replaced(out)
    with signals_held():
        if os.path.isdir(out):
            if os.path.isdir(old):  # the previous output of a switch that ended in this state: not needed
                shutil.rmtree(old)
            new = set(os.listdir(stage))
            for name in sorted(set(os.listdir(out)) - _previous_final(out, marker) - new):
                os.replace(os.path.join(out, name), os.path.join(stage, name))  # the run's and the user's files
            if _exchange(out, stage):
                os.replace(stage, old)
            else:
                os.replace(out, old)
                os.replace(stage, out)
        else:
            os.replace(stage, out)
        if os.path.isdir(old):
            shutil.rmtree(old)


def finish_swap(out: str, marker: str) -> None:
    """Complete what a kill cut inside swap_in: a complete OUT.staging/ (its marker there) is switched in, unless
    it is the previous output, already switched out (a lower generation than OUT's); a leftover OUT.replaced/ is
    deleted once OUT exists."""
    stage, old = staging(out), replaced(out)
    staged = _marker(stage, marker)
    if staged is not None:
        now = _marker(out, marker)
        if now is not None and "generation" in now and int(staged.get("generation", 0)) < int(now["generation"]):
            shutil.rmtree(stage)  # the previous output: the switch had happened
        else:
            swap_in(out, marker)
    if os.path.isdir(old):
        if os.path.isdir(out):
            shutil.rmtree(old)
        elif _marker(old, marker) is not None:  # no new output to take its place (removed by hand?): put it back
            os.replace(old, out)


def cut_swap(out: str, marker: str = "train_config.json") -> bool:
    """Whether a kill cut the switch of a trainer's output `out` (finish_swap has something to do): OUT.staging/
    holds a trainer's complete output, or OUT.replaced/ is left, beside a trainer's folder or none (between the
    two renames). Folders of those names beside anything else are not this project's: never touched."""
    staged = _marker(staging(out), marker)
    left = (staged is not None and bool(staged.get("script"))) or os.path.isdir(replaced(out))
    return left and (not os.path.lexists(out) or trainer_folder_owner(out) is not None)


def check_model_inputs(models: dict[str, str | None], marker: str = "train_config.json",
                       finished_only: bool = True) -> None:
    """Before a stage reads models (flag -> path; hub names and None pass): a folder that a trainer writes now is
    refused, naming the run; a trainer's output whose final switch a kill cut is completed here (under its lock,
    as the trainer's next start would), with a word; a trainer's output without its marker (a run stopped before
    its end) is refused, naming the command that finishes it (unless not finished_only: then the caller leaves
    it out). Rank 0 looks; every rank gets its verdict."""
    on_rank_0(_check_model_inputs, models, marker, finished_only)


def _check_model_inputs(models: dict[str, str | None], marker: str, finished_only: bool) -> None:
    for flag, path in models.items():
        if path and (os.path.isdir(path) or cut_swap(path, marker)):  # not a hub name
            _check_model_input(flag, path, marker, finished_only)


def _check_model_input(flag: str, path: str, marker: str, finished_only: bool) -> None:
    holder = live_holder(path)
    if holder:
        raise WltError(f"{flag} {path} is being written by another run: {_who(holder)}; wait for it to end")
    if cut_swap(path, marker) and os.path.isfile(lock_path(path)):  # a kill inside a switch left its run's lock
        stale = _holder_of_file(lock_path(path))
        try:
            with _holding(path, lambda: _take(path, flag)):  # rank 0 alone
                finish_swap(path, marker)
        except WltError as e:
            raise WltError(f"{flag} {path}: a kill cut the last step of the run that wrote it, and it cannot be "
                           f"completed from here ({e}); {_finish_command(path, stale)}") from None
        log(f"{flag} {path}: completed the final save that a kill had cut (the new output switched in whole)")
    owner = trainer_folder_owner(path)
    if finished_only and owner and _marker(path, marker) is None:
        raise WltError(f"{flag} {path}: an unfinished output of {owner} (no {marker}: its run stopped before the "
                       f"end); {_finish_command(path, _holder_of_file(lock_path(path)))}, or give a finished model")


def _holder_of_file(path: str) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _holder(fd)
    finally:
        os.close(fd)


def _finish_command(path: str, holder: dict) -> str:
    """What finishes a trainer's output: its command again with --resume (named when a killed run's lock left it)."""
    cmd = holder.get("command")
    if not cmd:
        return f"rerun the command that trains {path} with --resume to finish it"
    cmd = cmd if " --resume" in f" {cmd} " else f"{cmd} --resume"
    runner = "torchrun ... " if (holder.get("processes") or 1) > 1 else "python "
    return f"finish it with `{runner}{cmd}`"


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
