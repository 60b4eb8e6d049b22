"""Devices and processes: CUDA with bf16 or CPU with fp32, torchrun's process group, FSDP2 sharding, and the
data-parallel helpers the scripts share. A plain `python` run is one process and skips all of it."""
from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import random
import sys

import torch
import torch.nn as nn


def rank() -> int:
    """This process's global rank under torchrun (0 in a plain `python` run)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    """This process's GPU (its local rank, modulo the GPUs it sees: a launcher that shows each process one GPU
    gives every local rank cuda:0), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def autocast(dev: torch.device, dtype: str = "auto"):
    """bf16 autocast on CUDA (the default there), plain fp32 on CPU: bf16 matmuls on CPU are ~300x slower."""
    if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda"):
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(dev: torch.device, dtype: str = "auto") -> torch.dtype:
    """The dtype inference loads its weights in: bf16 where autocast computes in bf16 (CUDA by default, or
    --dtype bf16), else fp32, so a rank holds its weights once, in the precision they are used in."""
    return torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda") else torch.float32


DIST_TIMEOUT_MIN = 60.0  # --dist-timeout's default
_timeout_min = DIST_TIMEOUT_MIN  # the one this process's group was made with


def init_distributed(timeout_min: float = DIST_TIMEOUT_MIN) -> None:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU). A plain `python` run is one process.
    timeout_min (--dist-timeout): how long a rank waits in a collective for the others. Rank 0 alone loads the
    full model (build_model) and writes the final checkpoint while the others wait; NCCL's default of 10
    minutes is too short for a 7B model read from a hub or a slow disk."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        global _timeout_min
        _timeout_min = timeout_min
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))


def timed_out(e: BaseException) -> str | None:
    """One line for a collective that waited longer than --dist-timeout (gloo raises it as a RuntimeError in
    the rank that waited; NCCL's watchdog ends the process itself), else None."""
    if not (isinstance(e, RuntimeError) and torch.distributed.is_initialized() and "timed out" in str(e).lower()):
        return None
    return (f"rank {rank()}: waited longer than --dist-timeout {_timeout_min:g} min for another process in a collective ("
            f"{' '.join(str(e).split()).split('] ', 1)[-1][:150]}); rank 0 alone loads the whole model and writes the final "
            f"checkpoint while the others wait: if that takes longer, raise --dist-timeout (minutes)")


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over the ranks, returned where it came from."""
    return _all_reduce(t, torch.distributed.ReduceOp.SUM if world_size() > 1 else None)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise largest value of a tensor over the ranks, returned where it came from."""
    return _all_reduce(t, torch.distributed.ReduceOp.MAX if world_size() > 1 else None)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if world_size() > 1:
        r = t.to(device())  # nccl reduces CUDA tensors only
        torch.distributed.all_reduce(r, op=op)
        t = r.to(t.device)
    return t


def gather_dicts(d: dict) -> dict:
    """Merge every rank's dict on rank 0 (other ranks get {}): how sharded labeling and evaluation collect
    their results. Values must be picklable; a collective, so every rank must call it."""
    if world_size() == 1:
        return d
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, d)
    if rank() != 0:
        return {}
    out = {}
    for p in parts:
        out.update(p)
    return out


def broadcast(obj):
    """Rank 0's object on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# FSDP2


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the longest nn.ModuleList whose children share one class."""
    best = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def mixed_precision(dev: torch.device, dtype: str = "auto"):
    """FSDP2's precision: where the compute dtype is bf16 (CUDA by default, --dtype bf16 anywhere), bf16
    parameters gathered for the forward and backward, gradients reduced in fp32 onto fp32 master shards; plain
    fp32 otherwise. The same policy on CPU (gloo) as on CUDA (nccl), so the tests run the path a GPU runs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if compute_dtype(dev, dtype) == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, dev: torch.device, dtype: str = "auto") -> nn.Module:
    """FSDP2: one fully_shard unit per transformer block plus the root, in mixed_precision(dev, dtype)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    mp = mixed_precision(dev, dtype)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.wlt_forward = _call  # in_forward runs the log-prob kernel through it
    register_fsdp_forward_method(model, "wlt_forward")
    return model


def _call(thunk):
    return thunk()


def in_forward(model: nn.Module, fn, *args, **kwargs):
    """fn(model, *args, **kwargs), run as a forward of the model. The log-prob kernel (wlt.response_logps,
    wlt.pair_logps) runs the model's body, then reaches into its output head; FSDP2 gathers the root unit's
    weights (embeddings, head) only inside a forward, so shard_model registers `wlt_forward` as one. One process:
    the plain call."""
    if hasattr(model, "wlt_forward"):
        return model.wlt_forward(functools.partial(fn, model, *args, **kwargs))
    return fn(model, *args, **kwargs)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Keep only each transformer block's input for backward and recompute the block's activations there
    (Chen et al. 2016): activation memory falls from every intermediate of every block to one tensor per block
    plus one block's intermediates, for about one extra forward of compute. Non-reentrant checkpointing keeps
    the RNG state, so dropout draws the same masks in the recomputation. Under FSDP2 the block's parameters
    are gathered again for its backward before the recomputation runs."""
    from torch.utils.checkpoint import checkpoint
    for block in transformer_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state dict on CPU, on rank 0 (other ranks get {}). Under FSDP2 this is a collective:
    every rank must call it; parameters are gathered one at a time, so no rank but 0 ever holds the model."""
    if world_size() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if rank() == 0 else {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def leave_process_group() -> None:
    """End a finished multi-process run: wait until every rank is done, then leave without the C++ teardown.
    Left to that teardown (destroying the process group explicitly or at interpreter exit), a rank of a
    finished, successful gloo run occasionally aborts with "terminate called without an active exception"
    (exit code -6; seen in CI and in the test suite, too rarely to reproduce on demand), and torchrun then
    reports the whole run as failed. Every output file is complete and closed when main() returns, so after
    the barrier there is nothing left to do but flush the console and exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def per_rank(values: list[float]) -> list[list[float]]:
    """Every rank's `values` (the same length on each), indexed [value][rank], on every rank. A collective."""
    t = torch.zeros(len(values), world_size(), dtype=torch.float64)
    t[:, rank()] = torch.tensor(values, dtype=torch.float64)
    return all_reduce_sum(t).tolist()


# ----------------------------------------------------------------------------------------------------------
# data parallelism


def micro_batches(batch: list[int], micro: int) -> list[tuple[list[int], list[float]]]:
    """This rank's share of a global batch (items rank::world_size), cut into micro-batches.

    Every rank gets the same number of micro-batches (FSDP collectives run in every forward); a rank short
    of items pads with a copy of the batch's first item at weight 0, which adds nothing to loss or metrics.
    Returns [(indices, weights)]."""
    W, r = world_size(), rank()
    mine = batch[r::W]
    steps = max(1, math.ceil(math.ceil(len(batch) / W) / micro))
    out = []
    for j in range(steps):
        idx = mine[j * micro:(j + 1) * micro]
        w = [1.0] * len(idx)
        if not idx:
            idx, w = [batch[0]], [0.0]
        out.append((idx, w))
    return out


def sharded_map(n: int, micro: int, fn, *args) -> torch.Tensor:
    """fn(indices, *args) -> Tensor[len(indices), k] over the items 0..n-1, split over the ranks; the result
    on every rank as Tensor[n, k] in item order. Every rank runs the same number of calls (padding with item
    0), as FSDP's collectives need."""
    W, r = world_size(), rank()
    per = math.ceil(n / W)
    mine = list(range(r, n, W))
    mine += [0] * (per - len(mine))
    parts = [fn(mine[s:s + micro], *args).float().cpu() for s in range(0, per, micro)]
    local = torch.cat(parts) if parts else torch.zeros(0, 1)
    if W == 1:
        return local[:n]
    dev = device() if torch.cuda.is_available() else torch.device("cpu")
    gathered = [torch.empty_like(local, device=dev) for _ in range(W)]
    torch.distributed.all_gather(gathered, local.to(dev))
    full = torch.stack([g.cpu() for g in gathered], dim=1).reshape(W * per, -1)  # row r + W*j
    return full[:n]
