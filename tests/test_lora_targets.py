"""The default LoRA targets of every family in wlt.LORA_TARGETS cover every linear map of attention and MLP
(nn.Linear, or GPT-2's Conv1D) and nothing else: not the output head, not the embeddings. Built from tiny
configs of each family; a fused projection (Phi-3's qkv_proj and gate_up_proj) must be named as it is."""
import pytest
import torch.nn as nn

import wlt

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64, vocab_size=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
OVERRIDES = {  # config fields that a family names its own way
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neo": dict(num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]),
    "gemma": dict(head_dim=8), "gemma2": dict(head_dim=8), "gemma3_text": dict(head_dim=8),
}
BLOCKS = (".layers.", ".h.")  # the transformer blocks' container, by family; heads and embeddings sit outside


def linear_maps(model) -> set[str]:
    """Names of the linear maps inside the transformer blocks (attention and MLP)."""
    from transformers.pytorch_utils import Conv1D
    return {n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and any(b in f".{n}." for b in BLOCKS)}


@pytest.mark.parametrize("family", sorted(wlt.LORA_TARGETS))
def test_default_targets_cover_every_block_linear(family):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**COMMON, **OVERRIDES.get(family, {})}))
    block_linears = linear_maps(model)
    assert block_linears, f"{family}: no linear maps found in the blocks (test bug)"
    wlt.add_lora(model, rank=2, alpha=4)
    adapted = {n for n, m in model.named_modules() if isinstance(m, wlt.LoRALinear)}
    assert adapted == block_linears, (f"{family}: not adapted {sorted(block_linears - adapted)[:4]}, "
                                      f"adapted outside the blocks {sorted(adapted - block_linears)[:4]}")
