"""`python wlt.py estimate`: the memory a training run needs per device, before launching it.

Weights, gradients and AdamW moments are counted from the model's parameters, sharded over the devices as
FSDP2 shards them; activations by running the model's own forward on FakeTensors (shapes only, no memory),
with one and two transformer blocks, and extrapolating in the blocks. Checked within 20% against measured CPU
runs (tests/test_scale.py).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn as nn

import wlt
from lib.console import WltError, one_line
from lib.dist import transformer_blocks

# Published configs of the paper's models, so the estimate works without the hub (a local folder or config.json
# path, or any hub name reachable from here, works too).
KNOWN_CONFIGS = {
    "facebook/opt-125m": dict(model_type="opt", vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768),
    "facebook/opt-1.3b": dict(model_type="opt", vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                              num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     max_position_embeddings=4096, tie_word_embeddings=False),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=32768, tie_word_embeddings=False),
}


def model_config(name: str, trust_remote_code: bool = False):
    """A model's config from a folder, a config.json path, KNOWN_CONFIGS, or the hub."""
    from transformers import AutoConfig
    if name.endswith(".json") and os.path.isfile(name):
        with open(name) as f:
            d = json.load(f)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if not os.path.isdir(name) and name in KNOWN_CONFIGS:
        d = dict(KNOWN_CONFIGS[name])
        return AutoConfig.for_model(d.pop("model_type"), **d)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise WltError(f"no config for {name!r} (a folder, a config.json, or one of {', '.join(KNOWN_CONFIGS)}): "
                           f"{one_line(e)}") from None


def _fake_model(cfg, lora_rank: int, layers: int | None = None, dtype=torch.float32):
    """The model as FakeTensors (shapes only, no memory), with `layers` transformer blocks if given."""
    import copy as _copy
    from transformers import AutoModelForCausalLM
    cfg = _copy.deepcopy(cfg)
    if layers is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(cfg, key):
                setattr(cfg, key, layers)
        if getattr(cfg, "attention_types", None):  # GPT-Neo: one attention kind per layer
            cfg.attention_types = [[["global"], layers]]
            cfg.attention_layers = ["global"] * layers
        if getattr(cfg, "layer_types", None):  # Gemma-2/3, Qwen: one entry per layer
            cfg.layer_types = cfg.layer_types[:layers] + cfg.layer_types[-1:] * max(0, layers - len(cfg.layer_types))
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if lora_rank > 0:
        wlt.add_lora(model, lora_rank, 2.0 * lora_rank)
        for m in wlt.lora_modules(model):  # every parameter in the compute dtype, as under FSDP2's MixedPrecisionPolicy
            for lin in (m.lora_A, m.lora_B):
                lin.weight = nn.Parameter(lin.weight.detach().to(dtype))
    return model


def _saved_bytes(cfg, lora_rank: int, layers: int, batch: int, seq: int, dtype, train: bool) -> int:
    """Bytes autograd keeps for backward in one training forward of the model's body on [batch, seq] tokens,
    counted on FakeTensors (the code's real saved tensors, at no cost): every saved storage once, parameters
    left out."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _fake_model(cfg, lora_rank, layers, dtype).train(train)  # SFT keeps dropout, DPO does not
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s._cdata not in params:
                seen[s._cdata] = s.nbytes()
            return t
        ids = torch.zeros(batch, seq, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.base_model(input_ids=ids, use_cache=False)
    return sum(seen.values())


def estimate_memory(cfg, nproc: int = 1, lora_rank: int = 0, micro_batch: int = 1, max_len: int = 512,
                    kind: str = "dpo", dtype: str = "bf16", activation_checkpointing: bool = False,
                    batch_size: int | None = None) -> dict:
    """Expected peak memory per device (bytes) of train_sft.py / train_dpo.py, by part:

    weights      fp32 master weights, sharded over nproc (FSDP2)
    gathered     the compute copies FSDP2 all-gathers: the root unit (embeddings, head) for the whole step
                 plus two blocks (the current one and the prefetched one), in the compute dtype
    gradients    fp32 gradients of the trainable parameters, sharded
    optimizer    AdamW's two fp32 moments per trainable parameter, sharded
    activations  what autograd keeps for backward in one micro-batch of full-length sequences (SFT: micro;
                 DPO: 2 x micro, chosen and rejected unshared: an upper bound), traced on FakeTensors with 1
                 and 2 blocks and extrapolated linearly in the blocks; with activation checkpointing, one
                 block input per block plus one block's activations
    head         the log-prob kernel: hidden states at response positions and three [chunk, V] fp32 blocks
    mask         DPO's packed pairs (wlt.pack_pairs, up to wlt.PACK_MAX_LEN tokens): a [R, 1, T, T] boolean mask,
                 R <= micro rows of T = max_len, once per micro-batch; and, on CUDA (dtype bf16), the bf16 bias
                 that the memory-efficient attention kernel makes of it in every layer and keeps for backward
                 (recomputed instead under activation checkpointing). It grows as T^2
    unsharded    gradient accumulation under FSDP2 (batch_size more than one micro-batch per process): between the
                 micro-batches of a step the gradients are not reduce-scattered, so every rank holds the whole
                 model's trainable gradients, unsharded, in the reduce dtype (fp32)
    """
    c = 2 if dtype == "bf16" else 4
    cdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    with torch.device("meta"):
        model = _fake_model(cfg, lora_rank)
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    blocks = transformer_blocks(model)
    n_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    n_root = n_all - sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    train_block = max(sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks)
    train_rest = n_train - sum(sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks)
    L = len(blocks)
    seqs = micro_batch * (2 if kind == "dpo" else 1)
    one = _saved_bytes(cfg, lora_rank, 1, seqs, max_len, cdt, kind == "sft")
    two = _saved_bytes(cfg, lora_rank, 2, seqs, max_len, cdt, kind == "sft")
    per_block, outside = two - one, 2 * one - two
    hidden = cfg.get_text_config().hidden_size if hasattr(cfg, "get_text_config") else cfg.hidden_size
    if activation_checkpointing:
        acts = outside + L * c * hidden * seqs * max_len + per_block
    else:
        acts = outside + L * per_block
    V = model.get_output_embeddings().weight.shape[0]
    head = c * hidden * seqs * max_len + 3 * 4 * min(wlt.LOGPS_CHUNK, V * seqs * max_len)
    mask = 0
    if kind == "dpo" and max_len <= wlt.PACK_MAX_LEN:
        per_layer = 2 * L if dtype == "bf16" and not activation_checkpointing else 0  # CUDA's bias, bf16
        mask = micro_batch * max_len ** 2 * (1 + per_layer)
    accumulating = batch_size is not None and -(-batch_size // nproc) > micro_batch
    parts = {
        "weights": 4 * n_all / nproc,
        "gathered": 0 if nproc == 1 else c * (n_root + 2 * n_block),
        "gradients": 4 * n_train / nproc,
        "optimizer": 8 * n_train / nproc,
        "activations": acts,
        "head": head,
        "mask": mask,
        "unsharded": 4 * n_train if nproc > 1 and accumulating else 0,
    }
    parts["total"] = sum(parts.values())
    return {"bytes": parts, "parameters": n_all - n_lora, "lora": n_lora, "trainable": n_train, "blocks": L,
            "trainable_file": max(train_block, train_rest)}


def host_memory(res: dict, nproc: int = 1, dtype: str = "bf16") -> dict:
    """Host (CPU) memory per process, bytes, of the moments a run reads or writes weights, on GPUs, from
    estimate_memory's counts. Every figure counts the pages of memory-mapped files a process reads, as
    ru_maxrss does (the tests measure it so).

    load           the trainers: rank 0 reads the whole model in fp32 and sends every rank its shards (the
                   others allocate theirs on their GPU); one process reads it all
    checkpoint     a mid-run save, each rank, one file at a time: its shard of one transformer block's trainable
                   weights and AdamW moments (fp32, 12 bytes per trainable parameter / nproc; or of everything
                   outside the blocks, whichever is larger), copied off the GPU and serialised once more by
                   safetensors (measured on CPU: 2x the file; the copy off the device adds the third)
    resume         each rank reads the slices it holds, one file at a time: the file's pages and a tensor's copy
    final save     rank 0 gathers the full fp32 model, one tensor at a time, and writes it
    label/evaluate each rank reads a model in the compute dtype on the CPU and moves it to its GPU before reading
                   the next (accelerate not installed; with it, straight to the GPU). Reading an fp32 file (what
                   the trainers write) into bf16 also maps the file's pages while converting: page cache, shared by
                   the ranks of a node, but counted by each rank's ru_maxrss"""
    c = 2 if dtype == "bf16" else 4
    n_all = res["parameters"] + res["lora"]
    file = 12 * res["trainable_file"] / nproc
    return {
        "load, rank 0": 4 * n_all,
        "load, other ranks": 0 if nproc > 1 else 4 * n_all,
        "checkpoint save, each rank": 3 * file,
        "resume, each rank": 2 * file,
        "final save, rank 0": 4 * n_all,
        "label.py / evaluate.py, each rank": c * res["parameters"],
    }


def add_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--model", required=True,
                   help="model folder, config.json, hub name, or one of: " + ", ".join(KNOWN_CONFIGS))
    e.add_argument("--nproc", type=int, default=1, help="devices the model is sharded over (FSDP2)")
    e.add_argument("--kind", choices=["sft", "dpo"], default="dpo", help="SFT (sequences) or DPO (pairs: 2 sequences each)")
    e.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: 8 for DPO, 0 = full fine-tune for SFT)")
    e.add_argument("--micro-batch-size", type=int, default=1, help="sequences (SFT) or pairs (DPO) per device per forward")
    e.add_argument("--batch-size", type=int, default=None,
                   help="global batch, as the trainers' flag: more than --micro-batch-size per device means gradient "
                        "accumulation, which under FSDP2 holds every trainable gradient unsharded (default: no accumulation)")
    e.add_argument("--max-len", type=int, default=512,
                   help="tokens per sequence (the estimate assumes every sequence is this long)")
    e.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype (bf16 on CUDA, fp32 on CPU)")
    e.add_argument("--activation-checkpointing", action="store_true", help="as the trainers' flag")
    e.add_argument("--device-memory", type=float, default=None, help="GiB per device: say whether the run fits")
    e.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")


def estimate_cli(args) -> dict:
    cfg = model_config(args.model, args.trust_remote_code)
    kind = args.kind
    lora = args.lora_rank if args.lora_rank is not None else (8 if kind == "dpo" else 0)
    res = estimate_memory(cfg, args.nproc, lora, args.micro_batch_size, args.max_len, kind, args.dtype,
                          args.activation_checkpointing, args.batch_size)
    gib = 2 ** 30
    what = (f"{args.model}: {res['parameters'] / 1e9:.2f}B parameters"
            + (f" + {res['lora'] / 1e6:.1f}M LoRA" if res["lora"] else "") + f" ({res['trainable'] / 1e6:.1f}M trainable), "
            f"{kind.upper()} {'LoRA rank ' + str(lora) if lora else 'full fine-tune'}, {args.nproc} device(s), "
            f"micro-batch {args.micro_batch_size} x {args.max_len} tokens, {args.dtype}"
            + (", activation checkpointing" if args.activation_checkpointing else ""))
    lines = [what, "", "| part | GiB per device |", "| --- | ---: |"]
    lines += [f"| {k} | {v / gib:.2f} |" for k, v in res["bytes"].items()]
    if args.device_memory:
        fits = res["bytes"]["total"] <= args.device_memory * gib
        lines.append("")
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {args.device_memory:g} GiB per device")
    res["host"] = host_memory(res, args.nproc, args.dtype)
    lines += ["", "| host memory (CPU) | GiB per process |", "| --- | ---: |"]
    lines += [f"| {k} | {v / gib:.2f} |" for k, v in res["host"].items()]
    print("\n".join(lines))
    return res
