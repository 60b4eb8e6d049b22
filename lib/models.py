"""Loading models and tokenizers, with one-line errors for the usual mistakes (a wrong folder, no weights), and
building the model a trainer trains on every process (meta-device skeleton, FSDP2 shards filled from rank 0)."""
from __future__ import annotations

import os
import pickle
import re

import torch
import torch.nn as nn

import wlt
from lib.console import WltError, log, one_line, warn_once
from lib.dist import device, enable_activation_checkpointing, rank, set_seed, shard_model, world_size


def check_model_dir(path: str) -> None:
    """A clear error for a local model folder that is missing or has no weights (hub names pass through)."""
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1):
        raise WltError(f"{path}: no such model folder")
    if os.path.isdir(path):
        names = os.listdir(path)
        if "config.json" not in names:
            raise WltError(f"{path}: not a model folder (no config.json)")
        if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for n in names):
            raise WltError(f"{path}: model folder without weights (no *.safetensors)")
        check_weights(path, names)


# the pickled weight files from_pretrained reads when a folder has no safetensors weights
PICKLED_WEIGHTS = re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin")


def check_weights(path: str, names: list[str]) -> None:
    """Read the header of each safetensors file of a model folder (a few KB): a cut or damaged file is a
    one-line error before anything is loaded or written. A folder of pickled weights (pytorch_model*.bin, read
    only where it has no safetensors weights) is read as transformers reads it, with torch.load(weights_only=True),
    memory-mapped (the tensors are not read): a pickle that would run code, or a damaged file, is one line too."""
    from safetensors import SafetensorError, safe_open
    for n in sorted(names):
        if n.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, n), "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise WltError(f"{os.path.join(path, n)}: damaged weights file ({one_line(e)}); copy or save "
                                   f"the model again") from None
    if any(n.startswith("model") and n.endswith(".safetensors") for n in names):
        return
    for n in sorted(n for n in names if PICKLED_WEIGHTS.fullmatch(n)):
        try:
            torch.load(os.path.join(path, n), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:  # names something other than tensors and plain data
            what = re.search(r"GLOBAL (\S+)", str(e))
            raise WltError(f"{os.path.join(path, n)}: a pickle that holds more than weights"
                           f"{f' (it calls {what.group(1)})' if what else ''}, refused unread: loading it would run "
                           f"its code; where you trust it, save the model as safetensors (save_pretrained)") from None
        except (RuntimeError, OSError, EOFError) as e:
            raise WltError(f"{os.path.join(path, n)}: damaged weights file ({one_line(e)}); copy or save the model "
                           f"again") from None


def tokenizer_difference(a, b) -> str | None:
    """What would make the same token ids mean other text to two tokenizers, or None when nothing does: the
    vocabulary (every token's id, added tokens included) and the ids of BOS and EOS, which every sequence starts
    or ends with. The rest (files, their dates, padding side, chat template, model_max_length) may differ."""
    for name in ("bos", "eos"):
        x, y = getattr(a, f"{name}_token_id", None), getattr(b, f"{name}_token_id", None)
        if x != y:
            return f"{name.upper()} id {x} vs {y}"
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"{len(va)} vs {len(vb)} tokens"
    other = [t for t, i in va.items() if vb.get(t) != i]
    if other:
        t = min(other, key=va.get)
        return f"{len(other)} token(s) with other ids, e.g. {t!r}: {va[t]} vs {vb.get(t)}"
    return None


def check_same_tokenizer(a: tuple, b: tuple) -> None:
    """Two models used together score the same token ids, made by one tokenizer: (flag, path, tokenizer) of each
    must agree (tokenizer_difference), or one line names both, before any weights are read."""
    diff = tokenizer_difference(a[2], b[2])
    if diff:
        raise WltError(f"{a[0]} {a[1]} and {b[0]} {b[1]} have different tokenizers ({diff}): one model would score "
                       f"token ids that mean other text to it; use models of one tokenizer (a reference and the "
                       f"policy trained from it)")


def load_error(what: str, path: str, e: Exception) -> WltError:
    """One line for a model or tokenizer that cannot be loaded. The hub's usual cases are named with what to do
    (transformers wraps them in an OSError whose cause is huggingface_hub's error): a gated model (Llama,
    Mistral, Gemma) without a login, a name that is neither a folder nor a hub model, no cached copy offline."""
    chain, x = [], e
    while x is not None and len(chain) < 5:
        chain.append(type(x).__name__)
        x = x.__cause__ or x.__context__
    text = str(e)
    if "GatedRepoError" in chain or "gated repo" in text:
        return WltError(f"{path}: a gated model on the Hugging Face hub; request access on "
                            f"https://huggingface.co/{path}, then log in (`hf auth login`) or set HF_TOKEN to a "
                            f"token that has it")
    if "RepositoryNotFoundError" in chain or "not a valid repository name" in text:
        return WltError(f"{path}: no such local folder, and no {what} of that name on the Hugging Face hub (a "
                            f"private one needs a login: `hf auth login`, or HF_TOKEN)")
    if "LocalEntryNotFoundError" in chain or "couldn't connect to" in text:
        return WltError(f"{path}: not in the local hub cache, and the hub cannot be reached (offline or "
                            f"HF_HUB_OFFLINE=1); download it where the hub is reachable, or pass a local folder")
    return WltError(f"cannot load {what} {path!r}: {one_line(e)}")


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None):
    """A causal LM, its weights read once, in `dtype` (trainers: fp32 master weights; inference: the compute
    dtype, dist.compute_dtype), on `device` when given.

    transformers places weights on a device as it reads them (device_map) only with the accelerate package,
    which this project does not require: with it installed a CUDA load goes straight to the GPU; without it
    the weights are read on the CPU and then moved, so a rank's host memory holds this one model in `dtype`
    for the moment of the move (label.py and evaluate.py move each model before loading the next). On the CPU
    safetensors are memory-mapped: a file that already holds `dtype` becomes the weights without a copy."""
    import importlib.util
    from transformers import AutoModelForCausalLM
    check_model_dir(path)
    kw = {}
    if device is not None and device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
        kw["device_map"] = str(device)
    from safetensors import SafetensorError
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    except (OSError, SafetensorError) as e:
        raise load_error("model", path, e) from None
    return model.to(device) if device is not None else model


def import_model_code(path: str, trust_remote_code: bool = False) -> None:
    """Import a model's code (its family's modules in transformers, ~100 MiB of host memory for the first one)
    without reading a weight: build it on the meta device, which allocates nothing. Then the resident memory
    measured next is the libraries' and the code's, and what loading adds on top of it is the weights'."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise load_error("model", path, e) from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        raise load_error("tokenizer", path, e) from None


def pack_setting(value: str, model, flag: str = "--share-prompt") -> bool:
    """--share-prompt (DPO, label.py) or --pack (SFT): auto|on|off, resolved once for `model`: whether wlt.pair_logps
    packs each pair into one row (its prompt run once for all its responses, short pairs sharing a row). auto:
    where wlt.can_pack allows it; on where it does not: a one-line error."""
    if value == "on" and not wlt.can_pack(model):
        cfg = model.config
        raise WltError(f"{flag} on: model type {cfg.model_type!r} with {cfg._attn_implementation!r} attention cannot "
                       f"pack pairs into rows (that needs one of {', '.join(sorted(wlt.PACK_FAMILIES))} under sdpa or "
                       f"eager attention); use {flag} off or auto")
    return value == "on" or (value == "auto" and wlt.can_pack(model))


def warn_plain_path(model, sequences: int, max_len: int) -> None:
    """One line before the work when the memory-lean log-prob kernel does not know the model's family
    (wlt.HEAD_POST): its log-probs then go through the full [B, T, V] fp32 logits (wlt.response_logps_plain),
    whose size for a batch of `sequences` sequences of max_len tokens is said (logits and their log-softmax)."""
    if wlt.head_of(model) is None:
        kind = getattr(model.config, "model_type", None)
        mib = sequences * max_len * model.config.vocab_size * 4 * 2 / 2 ** 20
        warn_once(("plain path", kind), f"model type {kind!r} is not known to the memory-lean log-prob kernel: its "
                  f"log-probs go through the full [B, T, V] fp32 logits, about {mib:,.0f} MiB for {sequences} "
                  f"sequences of {max_len} tokens (and as much again for their gradients in training)")


def positions(path: str, trust_remote_code: bool = False) -> int | None:
    """The length of a model's position table from its config (None when the config does not say)."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise load_error("model config", path, e) from None
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def fit_max_len(args, path: str, flag: str) -> None:
    """Cap args.max_len to the positions of model `path` (flag: how the user named it), with a message: a longer
    sequence would index past the model's position table."""
    n = positions(path, getattr(args, "trust_remote_code", False))
    if n is not None and args.max_len > n:
        log(f"--max-len {args.max_len} is more than the {n} positions of {flag} {path}; using --max-len {n}")
        args.max_len = n


# ----------------------------------------------------------------------------------------------------------
# the model a trainer trains


def unique_state_keys(model: nn.Module) -> set:
    """State-dict keys without tied duplicates (e.g. lm_head.weight tied to the input embedding)."""
    keys = {n for n, _ in model.named_parameters()}
    keys |= {n for n, _ in model.named_buffers()}
    return keys


def add_lora(model: nn.Module, lora: dict) -> None:
    """wlt.add_lora, its refusals (a family without default targets, targets that match nothing) as one line."""
    try:
        wlt.add_lora(model, **lora)
    except ValueError as e:
        raise WltError(f"{e}; pass --lora-targets (module-name suffixes)") from None


def build_model(path: str, dev: torch.device, seed: int, trust_remote_code: bool = False, lora: dict | None = None,
                activation_checkpointing: bool = False, dtype: str = "auto") -> tuple[nn.Module, set]:
    """The model a trainer trains, on `dev`; under torchrun sharded with FSDP2. Returns (model, unique_keys)
    where unique_keys = the state-dict keys without tied duplicates. lora: wlt.add_lora's keyword arguments, or None.

    One process: load the weights, add LoRA (seeded), move to dev. N processes: only rank 0 reads the weights
    (into CPU memory: one copy in the whole job, not one per rank, which is what lets a 7B model start on a
    node of 8 GPUs); every rank builds the same architecture on the meta device (no memory), shards it (one
    FSDP2 unit per block + the root), allocates only its own shards (to_empty) and receives them from rank 0
    (set_model_state_dict with broadcast_from_rank0). Buffers that are not in a state dict (rotary
    frequencies, causal masks) are broadcast too. LoRA weights are drawn once, on rank 0, with the seed of
    the one-process path, and travel with the rest: every rank holds the same adapter, and N processes start
    from exactly the weights of one."""
    set_seed(seed)
    W = world_size()
    full = None
    if W == 1 or rank() == 0:
        full = load_model(path, trust_remote_code)
        if lora:
            set_seed(seed)
            add_lora(full, lora)
    if W == 1:
        if activation_checkpointing:
            enable_activation_checkpointing(full)
        return full.to(dev), unique_state_keys(full)
    from transformers import AutoConfig, AutoModelForCausalLM
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, trust_remote_code=trust_remote_code)
        if lora:
            add_lora(model, lora)
    unique_keys = unique_state_keys(model)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    shard_model(model, dev, dtype)
    model.to_empty(device=dev)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    src = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if full is not None:
                buf.copy_(src[name])
            torch.distributed.broadcast(buf, src=0)
    if full is not None:
        model.generation_config = full.generation_config
    del full
    return model, unique_keys


def setup_model(args, lora: dict | None = None) -> tuple[nn.Module, set]:
    """The model a trainer trains, on every rank (build_model), and one line saying what it is. lora: wlt.add_lora's
    keyword arguments, or None (a full fine-tune). Returns (model, the state-dict keys without tied duplicates)."""
    dev = device()
    model, unique_keys = build_model(args.model, dev, args.seed, args.trust_remote_code, lora,
                                     args.activation_checkpointing, args.dtype)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)  # DTensor.numel() is the global size
    n_all = sum(p.numel() for p in model.parameters())
    log(f"model {args.model}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable, "
        f"device {dev}, {world_size()} process(es)")
    return model, unique_keys
