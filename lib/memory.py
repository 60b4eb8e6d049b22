"""Memory figures the scripts report: what a training rank holds (parameters, optimizer state, the CUDA peak)
and, for the inference scripts (label.py, evaluate.py), peak host memory per rank against a baseline taken
before any weight is read. Host memory on CPU has no torch counter: ru_maxrss (the peak) and /proc (now)."""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

from lib.dist import all_reduce_max, per_rank
from lib.models import import_model_code


def memory_report(model: nn.Module, opt) -> dict:
    """What one rank holds, in MiB, the largest over the ranks: its shards of the parameters and of the
    optimizer state (AdamW moments), counted from the tensors themselves; on CUDA also the allocator's peak.
    Under FSDP2 with N ranks the first two are about 1/N of a one-process run's. A collective."""
    params = sum(_local_bytes(p) for p in model.parameters())
    optim = sum(_local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    vals = all_reduce_max(torch.tensor([params, optim, cuda_peak], dtype=torch.float64))
    mib = [float(v) / 2 ** 20 for v in vals]
    out = {"params_mib_per_rank": mib[0], "optimizer_mib_per_rank": mib[1]}
    if torch.cuda.is_available():
        out["cuda_peak_mib_per_rank"] = mib[2]
    return out


def host_rss_mib() -> float:
    """This process's resident host memory now, MiB (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def host_peak_mib() -> float:
    """This process's peak resident host memory so far (getrusage ru_maxrss), MiB. It counts the pages of
    memory-mapped files a process has read (safetensors weights on the CPU) as well as its own allocations."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def weight_bytes(*models) -> int:
    """Bytes of the parameters and buffers of the given models, each storage once (tied weights, a model
    shared by two roles)."""
    seen = {}
    for m in models:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            t = t.to_local() if hasattr(t, "to_local") else t
            seen[(t.device, t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
    return sum(seen.values())


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()




class HostMemory:
    """Per-rank host memory of an inference script. Built before any weight is read: it imports the model code
    of the given folders (transformers' modules for a family cost ~100 MiB the first time), then takes the
    resident memory as the baseline, so that what comes on top of it is the weights' and the work's.

        host = HostMemory([model_dir, ...], trust_remote_code)
        ...load and run the models...
        summary.update(host.report(pol, ref))      # a collective: every rank calls it
    """

    def __init__(self, model_dirs, trust_remote_code: bool = False):
        for path in set(model_dirs):
            if os.path.isfile(os.path.join(path, "config.json")):
                import_model_code(path, trust_remote_code)
        self.before = host_rss_mib()

    def report(self, *models) -> dict:
        """Every rank's figures, MiB, indexed by rank: peak host memory (ru_maxrss), the baseline, and (when
        models are given) the bytes of the weights the rank holds, each storage once (on the device, on CUDA)."""
        values = [host_peak_mib(), self.before] + ([weight_bytes(*models) / 2 ** 20] if models else [])
        names = ["host_peak_mib_per_rank", "host_before_load_mib_per_rank", "weights_mib_per_rank"]
        return dict(zip(names, per_rank(values)))
