"""Loading models and tokenizers, with one-line errors for the usual mistakes (a wrong folder, no weights)."""
from __future__ import annotations

import os

import torch

import wlt
from lib.console import one_line


def check_model_dir(path: str) -> None:
    """A clear error for a local model folder that is missing or has no weights (hub names pass through)."""
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1):
        raise wlt.WltError(f"{path}: no such model folder")
    if os.path.isdir(path):
        names = os.listdir(path)
        if "config.json" not in names:
            raise wlt.WltError(f"{path}: not a model folder (no config.json)")
        if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for n in names):
            raise wlt.WltError(f"{path}: model folder without weights (no *.safetensors)")


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None):
    """A causal LM, its weights read once, in `dtype` (trainers: fp32 master weights; inference: the compute
    dtype), placed on `device` as they are read when given."""
    from transformers import AutoModelForCausalLM
    check_model_dir(path)
    kw = {"device_map": str(device)} if device is not None else {}
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    except OSError as e:
        raise wlt.WltError(f"cannot load model {path!r}: {one_line(e)}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        raise wlt.WltError(f"cannot load tokenizer {path!r}: {one_line(e)}") from None
