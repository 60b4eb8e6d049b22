"""Weights on disk, all safetensors (anything else is plain data read with torch.load(weights_only=True)):

    save_hf_checkpoint        a trainer's final model, in the layout from_pretrained reads
    save_adapter/load_adapter a LoRA adapter in the layout the PEFT library reads
    save_checkpoint ...       a trainer's mid-run state (OUT/checkpoint/), for --resume: each rank's shards
                              through torch.distributed.checkpoint
    save_ref_logps ...        train_dpo.py's reference log-probs, computed once (OUT/ref_logps.safetensors)
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import warnings

import torch
import torch.nn as nn

import wlt
from lib import dist
from lib.console import WltError, log, one_line
from lib.dist import barrier, rank, world_size
from lib.files import atomic_write, read_json, remove_dir, what_changed, write_json


SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shard_size(text: str) -> int:
    """--max-shard-size as bytes: a number with an optional unit, decimal (KB, MB, GB, as save_pretrained reads
    them) or binary (KiB, MiB, GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MB or 2000000")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}[unit]
    n = int(float(m.group(1)) * scale)
    if n < 1:
        raise ValueError(f"{text!r}: a shard must hold at least one byte")
    return n


def config_dtype(model_path: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model came in, from its config (`dtype`, or the older `torch_dtype`): the dtype its final
    checkpoint is saved in. fp32 when the config names none or something other than fp32/bf16/fp16."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return torch.float32
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if d in SAVE_DTYPES.values() else torch.float32


def _saved_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """Floating-point tensors are saved in `dtype` (None: their own); integer buffers stay as they are."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _write_weights(path: str, tensors: dict, dtype: torch.dtype | None) -> int:
    """One safetensors file of `tensors` cast to `dtype`, written atomically; returns its tensor bytes. Empties
    `tensors` as it casts: a tensor nothing else holds is freed as soon as its copy exists."""
    from safetensors.torch import save_file
    out = {}
    for k in list(tensors):
        v = tensors.pop(k)
        out[k] = v.detach().to("cpu", _saved_dtype(v, dtype)).contiguous()
        del v
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    return sum(t.numel() * t.element_size() for t in out.values())


WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def save_hf_checkpoint(out_dir: str, sd: dict, model, tokenizer, unique_keys: set | None = None,
                       dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> None:
    """Write an HF checkpoint (config.json, generation_config.json, the weights, tokenizer) from a full state
    dict, as save_pretrained lays it out: floating-point tensors in `dtype` (None: as they are), one
    model.safetensors, or, above max_shard_bytes, model-0000i-of-0000n.safetensors files and
    model.safetensors.index.json (the weight map from_pretrained reads). Each file is written atomically;
    weight files of an earlier save that this one does not write are removed. `unique_keys` drops tied duplicates
    (unique_state_keys of the unsharded model).

    Host memory: `sd` is consumed, its tensors dropped file by file as their cast copies are made, so a state
    dict gathered for the save (multi-process or CUDA runs) shrinks while it is written; where its tensors are
    the live model's own (one CPU process), one file's cast copies at most come on top."""
    os.makedirs(out_dir, exist_ok=True)
    keys = [k for k in sd if unique_keys is None or k in unique_keys]
    shards, size = [[]], 0
    for k in keys:  # in state-dict order, as save_pretrained groups them
        n = sd[k].numel() * _saved_dtype(sd[k], dtype).itemsize
        if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    total = 0
    for name, ks in zip(names, shards):  # one file's tensors at a time
        total += _write_weights(os.path.join(out_dir, name), {k: sd.pop(k) for k in ks}, dtype)
    written = set(names)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, ks in zip(names, shards) for k in ks}}
        write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
        written.add("model.safetensors.index.json")
    for f in os.listdir(out_dir):  # an earlier save's files would shadow or contradict these
        if WEIGHT_FILES.fullmatch(f) and f not in written:
            os.remove(os.path.join(out_dir, f))
    cfg = model.config
    if dtype is not None:  # the config names the dtype on disk (loading in fp32 for training changed it)
        import copy
        cfg = copy.deepcopy(cfg)
        cfg.dtype = dtype
    cfg.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's layout: adapter/adapter_config.json + adapter/adapter_model.safetensors with keys
# base_model.model.<module path>.lora_A.weight (wlt.split_lora_state_dict names them)


def save_adapter(out_dir: str, adapter_sd: dict, lora_cfg: dict, base_model: str) -> None:
    """Write adapter/adapter_config.json + adapter/adapter_model.safetensors in the layout PEFT reads."""
    from safetensors.torch import save_file
    d = os.path.join(out_dir, "adapter")
    os.makedirs(d, exist_ok=True)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora_cfg["r"], "lora_alpha": lora_cfg["lora_alpha"], "lora_dropout": lora_cfg["lora_dropout"],
        "target_modules": lora_cfg["target_modules"], "fan_in_fan_out": lora_cfg["fan_in_fan_out"],
        "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    atomic_write(os.path.join(d, "adapter_model.safetensors"),
                 lambda tmp: save_file({k: v.contiguous() for k, v in adapter_sd.items()}, tmp,
                                       metadata={"format": "pt"}))
    write_json(os.path.join(d, "adapter_config.json"), cfg)


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Put a saved adapter (PEFT layout) on a base model: wlt.add_lora with its settings, then load A and B."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise WltError(f"{adapter_dir}: no adapter_config.json")
    try:
        cfg = read_json(cfg_path)
        r, alpha, targets = cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WltError(f"{cfg_path}: not a LoRA adapter config ({one_line(e)})") from None
    if not isinstance(targets, list):  # PEFT also allows a regex string; this project writes lists
        raise WltError(f"{cfg_path}: target_modules must be a list of module names, got {targets!r}")
    try:
        wlt.add_lora(model, r, alpha, 0.0, targets)
    except ValueError as e:  # its targets match nothing here: an adapter of another model
        raise WltError(f"{adapter_dir}: adapter does not fit this model ({e})") from None
    sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    own = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    expected = {k for k, _ in model.named_parameters() if ".lora_A." in k or ".lora_B." in k}
    missing, unexpected = sorted(expected - own.keys()), sorted(own.keys() - expected)
    if missing or unexpected:
        raise WltError(f"{adapter_dir}: adapter does not fit this model "
                           f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
    model.load_state_dict(own, strict=False)  # strict=False: the base weights are not in the adapter
    return model


# ----------------------------------------------------------------------------------------------------------
# mid-run checkpoints: OUT/checkpoint/ holds the newest one
#
#   shard-0000R-model-0000F-of-0000K.safetensors
#                        rank R-1's shards of the trainable parameters (with LoRA: the adapter) and of the
#                        optimizer's per-parameter state (AdamW moments, step), file F for transformer block F-2
#                        (F = 1: everything outside the blocks), written by that rank through
#                        torch.distributed.checkpoint (DCP) with its safetensors storage; each tensor piece carries
#                        its offset in the full tensor, so any number of processes can read them back
#   state.pt             step (= the data position: the batch plan is a pure function of the seed), scheduler,
#                        optimizer hyper-parameters (param_groups), the shard file names, the number of processes,
#                        and the settings + input fingerprints it belongs to
#   rng-RANK.pt          each rank's torch / CUDA / python RNG state (dropout draws)
# Both .pt files hold plain numbers and strings and are read with torch.load(weights_only=True).
# No rank ever holds more than its own shards: saving writes them as they are, and resuming reads from each
# file only the slices this rank holds (DCP reshards when the number of processes changed).
# Written to checkpoint.tmp/, then swapped in by renames, so a kill at any moment leaves either the previous
# checkpoint or the new one complete (a kill between the two renames leaves it as checkpoint.old/).

CKPT = "checkpoint"


def remove_checkpoints(out_dir: str) -> None:
    """Remove every mid-run checkpoint folder of a training output (newest, previous, half-written)."""
    for d in (CKPT, CKPT + ".old", CKPT + ".tmp"):
        remove_dir(os.path.join(out_dir, d))


def require_dcp():
    """(dcp module, HuggingFaceStorageWriter, HuggingFaceStorageReader), or a one-line error on an older torch."""
    import inspect
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
        ok = "save_distributed" in inspect.signature(HuggingFaceStorageWriter.__init__).parameters
    except ImportError:
        ok = False
    if not ok:
        raise WltError(f"mid-run checkpoints (--save-every, --resume) need a torch whose "
                           f"torch.distributed.checkpoint has HuggingFaceStorageWriter(save_distributed=...) "
                           f"(tested with 2.13); this is torch {torch.__version__}: upgrade torch, or pass --save-every 0")
    return dcp, HuggingFaceStorageWriter, HuggingFaceStorageReader


def _sharded_state(model: nn.Module, opt) -> tuple[dict, list]:
    """This rank's trainable state as DCP saves and loads it: {"model": {fqn: tensor}, "optim": {fqn: {name:
    tensor}}}, and the optimizer's param_groups (plain data). Under FSDP2 the tensors are this rank's DTensor
    shards, in one process the tensors themselves: the parameters and moments, not copies, so loading writes
    straight into them. Frozen parameters (the base under LoRA) never change and are left out.

    The optimizer's moments do not exist before its first step (AdamW makes them lazily); get_state_dict
    creates them first (torch's _init_optim_state: one optimizer step with zero gradients at learning rate 0,
    which leaves the weights as they are), so on resume the template holds every tensor the checkpoint has.
    A number among the per-parameter state (an optimizer that keeps its step as a float) becomes a 0-d tensor:
    DCP would pickle anything that is not a tensor.

    Tied weights (lm_head.weight is the input embedding in OPT, GPT-2, SmolLM2, Gemma, ...) are one parameter
    under two names: the state dict holds it twice, and safetensors refuses to write one storage twice. It is
    kept once, under its first name (model.named_parameters(), which lists each parameter once); on resume DCP
    writes into that one parameter, so the tie holds (one storage) and both names see the restored weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    once = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    msd = {k: v for k, v in msd.items() if k in once}
    state = {fqn: {k: v if torch.is_tensor(v) else torch.tensor(v) for k, v in st.items()}
             for fqn, st in osd["state"].items()}
    return {"model": msd, "optim": state}, osd["param_groups"]


class _DcpLogs(logging.Filter):
    """Drops DCP's own log records (it logs to the root logger, with tracebacks, before raising)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "distributed/checkpoint" not in record.pathname.replace(os.sep, "/")


def _dcp_call(fn, what: str, path: str, **kw) -> None:
    """Run dcp.save / dcp.load; a failure on any rank becomes the same one-line error on every rank. DCP's
    CheckpointException derives from BaseException (so it is named here); a damaged file can also fail outside
    DCP's own error handling. In a one-process run DCP warns that it has no process group, which is meant."""
    from torch.distributed.checkpoint.api import CheckpointException
    drop = _DcpLogs()
    logging.getLogger().addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
            fn(**kw)
    except (CheckpointException, Exception) as e:
        failures = getattr(e, "failures", None)  # {rank: (exception, traceback)}
        if failures:
            r, (exc, _) = min(failures.items())
            if not isinstance(exc, Exception):  # a stop signal (lib.signals.Interrupted) inside DCP: pass it on
                raise exc from None
            msg = f"rank {r}: {one_line(exc)}"
        else:
            msg = one_line(e)
        raise WltError(f"{path}: cannot {what} the checkpoint ({msg})"
                           + ("; remove it or run without --resume" if what == "read" else "")) from None
    finally:
        logging.getLogger().removeFilter(drop)


def _file_of(key: str) -> int:
    """The file (1..) a tensor of the checkpoint goes to, by its name as DCP flattens it (model.<fqn>,
    optim.<fqn>.<state>): one per transformer block (the first number in the name), one for the rest. DCP
    writes, and reads back, one file at a time: a rank's host memory then holds one block's share of its state
    while saving or resuming, not its whole shard."""
    m = re.search(r"\.(\d+)\.", key)
    return int(m.group(1)) + 2 if m else 1


def save_checkpoint(out_dir: str, model: nn.Module, opt, sched, step: int, settings: dict, inputs: dict) -> None:
    """Save the training state after `step` optimizer steps. A collective: every rank must call it."""
    dcp, Writer, _ = require_dcp()
    final, tmp, old = (os.path.join(out_dir, d) for d in (CKPT, CKPT + ".tmp", CKPT + ".old"))
    if rank() == 0:
        remove_dir(tmp)
        os.makedirs(tmp)
    barrier()
    sd, param_groups = _sharded_state(model, opt)
    keys = [f"model.{k}" for k in sd["model"]] + [f"optim.{fqn}.{k}" for fqn, st in sd["optim"].items() for k in st]
    # every rank writes its own files; returns once every rank's files are written
    _dcp_call(dcp.save, "write", tmp, state_dict=sd,
              storage_writer=Writer(tmp, save_distributed=True, fqn_to_index_mapping={k: _file_of(k) for k in keys}))
    del sd
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, f"rng-{rank()}.pt"))
    if rank() == 0:
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
        torch.save({"step": step, "sched": sched.state_dict(), "param_groups": param_groups, "files": files,
                    "world_size": world_size(), "args": settings, "inputs": inputs}, os.path.join(tmp, "state.pt"))
    barrier()
    if rank() == 0:
        if os.path.isdir(final):
            remove_dir(old)
            os.replace(final, old)
        os.replace(tmp, final)
        remove_dir(old)
    barrier()


def checkpoint_to_resume(out_dir: str, settings: dict, inputs: dict) -> tuple[str | None, int]:
    """(folder, step) of a complete checkpoint in out_dir made with the same settings and inputs, or (None, 0).
    A checkpoint of other settings is removed, so it can never be resumed later by mistake. Every rank calls it;
    rank 0 decides from its file system and tells the others, so that every rank resumes from the same step."""
    found, step = dist.broadcast(_checkpoint_found(out_dir, settings, inputs) if rank() == 0 else None)
    if found is None and rank() == 0:
        remove_checkpoints(out_dir)
    barrier()  # the checkpoint is read only after rank 0 has decided (and removed one of other settings)
    return found, step


def _checkpoint_found(out_dir: str, settings: dict, inputs: dict) -> tuple[str | None, int]:
    found, step = None, 0
    for d in (CKPT, CKPT + ".old"):
        path = os.path.join(out_dir, d)
        if not os.path.isfile(os.path.join(path, "state.pt")):
            continue
        try:
            st = torch.load(os.path.join(path, "state.pt"), weights_only=True)
        except Exception as e:  # cut or damaged from outside: the renames never leave a half-written one
            log(f"{path}: unreadable state.pt ({one_line(e)}); starting from step 0")
            break
        files = st.get("files")
        if files is None:
            log(f"{path}: an older checkpoint format (one weights.safetensors); starting from step 0")
        elif not files or not all(os.path.isfile(os.path.join(path, f)) for f in files):
            log(f"{path}: shard files missing; starting from step 0")
        elif st.get("inputs") == inputs and all(st.get("args", {}).get(k) == v for k, v in settings.items()):
            found, step = path, int(st["step"])
            if st.get("world_size") != world_size():
                log(f"warning: {path} was saved by {st.get('world_size')} process(es), resumed by {world_size()}: "
                    f"the result will not be bit-equal to an uninterrupted run")
        else:
            log(f"{path}: made with other settings or inputs ({what_changed(st, settings, inputs, ignore=())}); "
                f"starting from step 0")
        break
    return found, step


def resume(out_dir: str, model: nn.Module, opt, sched, settings: dict, inputs: dict) -> int:
    """--resume: restore the newest checkpoint in out_dir made with the same settings and inputs (weights,
    optimizer, schedule, RNG) and return its step, the data position (the batch plan is fixed by the seed); 0 when
    there is none. A collective: every rank must call it."""
    path, step = checkpoint_to_resume(out_dir, settings, inputs)
    if path:
        load_checkpoint(path, model, opt, sched)
    return step


def load_checkpoint(path: str, model: nn.Module, opt, sched) -> None:
    """Restore model (trainable parameters), optimizer, scheduler and this rank's RNG from save_checkpoint's
    folder. Each rank reads only the slices of the shard files that it holds. A collective: every rank must
    call it."""
    dcp, _, Reader = require_dcp()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    st = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    sd, _ = _sharded_state(model, opt)  # this rank's tensors, in its shapes: DCP fills them in place
    _dcp_call(dcp.load, "read", path, state_dict=sd, storage_reader=Reader(path))
    # the tensors already hold the checkpoint; set_state_dict puts the saved param_groups (learning rate, ...)
    # back and is where a model whose state_dict tensors are copies would receive them. strict=False: the frozen
    # base weights are not in a checkpoint (the template above decided which tensors must be there)
    set_state_dict(model, opt, model_state_dict=sd["model"],
                   optim_state_dict={"state": sd["optim"], "param_groups": st["param_groups"]},
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    del sd
    sched.load_state_dict(st["sched"])
    rng_path = os.path.join(path, f"rng-{rank()}.pt")
    if os.path.isfile(rng_path):  # absent when resuming on more ranks than saved
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    log(f"resumed from {path} at step {st['step']}")


# ----------------------------------------------------------------------------------------------------------
# train_dpo.py's reference log-probs, computed once before the loop

REF_LOGPS = "ref_logps.safetensors"


def save_ref_logps(out_dir: str, key: dict, train: torch.Tensor, evals: torch.Tensor) -> None:
    """OUT/ref_logps.safetensors with "train" [epochs, N_train, 2] (per epoch, per training pair: log pi_ref of
    chosen, rejected) and "eval" [N_eval, 2], plus the settings and input fingerprints they belong to (metadata
    "key"). Rank 0 writes."""
    if rank() == 0:
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(os.path.join(out_dir, REF_LOGPS), lambda tmp: save_file(
            {"train": train.contiguous(), "eval": evals.contiguous()}, tmp, metadata={"key": json.dumps(key, sort_keys=True)}))
    barrier()


def load_ref_logps(out_dir: str, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached reference log-probs (train, eval) when they were made with the same key, else None. Rank 0
    reads them and sends them to the others: every rank reuses them, or every rank computes them again."""
    return dist.broadcast(_read_ref_logps(out_dir, key) if rank() == 0 else None)


def _read_ref_logps(out_dir: str, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    from safetensors import safe_open
    path = os.path.join(out_dir, REF_LOGPS)
    try:
        with safe_open(path, "pt") as f:
            if f.metadata().get("key") != json.dumps(json.loads(json.dumps(key)), sort_keys=True):
                log(f"{path}: made with other settings or inputs; computing the reference again")
                return None
            train, evals = f.get_tensor("train"), f.get_tensor("eval")
    except Exception as e:  # missing or unreadable (any safetensors error): compute it again
        if os.path.exists(path):
            log(f"{path}: unreadable ({one_line(e)}); computing the reference again")
        return None
    log(f"{path}: reference log-probs reused")
    return train, evals
