"""LoRA (wlt.py, the section after Eq. 6) on every tiny model family (GPT-2's transposed Conv1D included): identity at
init, the disable switch, merging (in place and from a state dict), the PEFT on-disk adapter layout and,
when peft is installed, loading that adapter with peft itself."""
import json
import os
import types

import pytest
import torch
import torch.nn as nn

import wlt
from lib import checkpoint, models
from lib.console import WltError
from conftest import FAMILIES

RANK, ALPHA = 4, 8.0

# The module paths each family's default targets must hit in the 2-layer tiny models.
EXPECTED = {
    "opt": [f"model.decoder.layers.{i}.{m}" for i in range(2) for m in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")],
    "gpt2": [f"transformer.h.{i}.{m}" for i in range(2) for m in
             ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")],
    "llama": [f"model.layers.{i}.{m}" for i in range(2) for m in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
    "gpt_neox": [f"gpt_neox.layers.{i}.{m}" for i in range(2) for m in
                 ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")],
}


def _load(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def inputs(bpe_tokenizer):
    g = torch.Generator().manual_seed(1)  # drawn on the CPU, then on the suite's device (WLT_TEST_DEVICE)
    ids = torch.randint(3, len(bpe_tokenizer), (2, 11), generator=g, device="cpu").to(torch.get_default_device())
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _in_out(module):
    """(in, out) of a base linear map, read from its weight layout: nn.Linear [out, in], Conv1D [in, out]."""
    from transformers.pytorch_utils import Conv1D
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    assert isinstance(module, nn.Linear)
    return module.weight.shape[1], module.weight.shape[0]


def _adapter_model(model_dir, seed=0):
    """A fresh model with a LoRA adapter whose B is random (so the adapter changes the outputs)."""
    model = _load(model_dir)
    torch.manual_seed(seed)
    wlt.add_lora(model, RANK, ALPHA)
    for m in wlt.lora_modules(model):
        nn.init.normal_(m.lora_B.weight, std=0.2)
    return model


# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_identity_disable_and_merge(family, tiny_model_dir, inputs):
    d = tiny_model_dir(family)
    base = _load(d)
    base_logits = _logits(base, inputs)
    base_keys = set(base.state_dict().keys())

    model = _load(d)
    torch.manual_seed(0)
    wlt.add_lora(model, RANK, ALPHA)
    mods = wlt.lora_modules(model)
    assert mods, "add_lora wrapped nothing"
    if family == "gpt2":
        assert all(m.fan_in_fan_out for m in mods), "GPT-2 Conv1D layers must be handled as fan_in_fan_out"
    else:
        assert not any(m.fan_in_fan_out for m in mods)
    # B = 0: a fresh adapter is the base model, exactly
    assert torch.equal(_logits(model, inputs), base_logits)

    for m in mods:
        nn.init.normal_(m.lora_B.weight, std=0.2)
    lora_logits = _logits(model, inputs)
    assert (lora_logits - base_logits).abs().max() > 1e-3, "a random B must change the outputs"

    with wlt.lora_disabled(model):
        assert all(m.disabled for m in mods)
        assert torch.equal(_logits(model, inputs), base_logits)
    assert not any(m.disabled for m in mods), "the switch must be restored"
    assert torch.equal(_logits(model, inputs), lora_logits)
    # restored on an exception too
    with pytest.raises(RuntimeError):
        with wlt.lora_disabled(model):
            raise RuntimeError("boom")
    assert not any(m.disabled for m in mods)

    merged = wlt.merge_lora(model)
    assert not wlt.lora_modules(merged)
    assert not any(type(m).__name__ == "LoRALinear" for m in merged.modules())
    assert set(merged.state_dict().keys()) == base_keys
    for name in EXPECTED[family]:
        assert type(merged.get_submodule(name)) is type(base.get_submodule(name))
        assert merged.get_submodule(name).weight.shape == base.get_submodule(name).weight.shape
    assert torch.allclose(_logits(merged, inputs), lora_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_equals_hand_merged_weights(family, tiny_model_dir, inputs):
    """Independent formula: W' = W + (alpha / r) B A ([out, in]; transposed for Conv1D's [in, out] weight),
    written into a plain base model, gives the adapter model's outputs."""
    from transformers.pytorch_utils import Conv1D
    d = tiny_model_dir(family)
    model = _adapter_model(d)
    ref = _load(d)
    with torch.no_grad():
        for name in EXPECTED[family]:
            lm = model.get_submodule(name)
            A, B = lm.lora_A.weight, lm.lora_B.weight
            delta = (ALPHA / RANK) * (B @ A)  # [out, in]
            target = ref.get_submodule(name)
            if isinstance(target, Conv1D):
                delta = delta.T
            target.weight += delta
    assert torch.allclose(_logits(ref, inputs), _logits(model, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_and_trainable(family, tiny_model_dir):
    model = _load(tiny_model_dir(family))
    wlt.add_lora(model, RANK, ALPHA)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, wlt.LoRALinear))
    assert wrapped == sorted(EXPECTED[family])
    assert sorted(model.wlt_lora["modules"]) == sorted(EXPECTED[family])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(f"{n}.lora_{x}.weight" for n in EXPECTED[family] for x in "AB")
    assert trainable == expected
    # gradients flow to A and B only
    ids = torch.randint(3, 100, (1, 6))
    model(input_ids=ids).logits.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_unknown_model_type_and_no_match_raise(tiny_model_dir):
    class Bogus(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="bogus_lm")
            self.q_proj = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no default LoRA targets for model type 'bogus_lm'"):
        wlt.add_lora(Bogus(), RANK, ALPHA)
    no_config = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default LoRA targets for model type None"):
        wlt.add_lora(no_config, RANK, ALPHA)
    model = _load(tiny_model_dir("opt"))
    with pytest.raises(ValueError, match="match no linear layer"):
        wlt.add_lora(model, RANK, ALPHA, targets=["no_such_module"])
    # the scripts' way in (lib.models.add_lora): one line that names the flag to pass
    with pytest.raises(WltError, match="no default LoRA targets for model type 'bogus_lm'.*; pass --lora-targets"):
        models.add_lora(Bogus(), {"rank": RANK, "alpha": ALPHA})
    # explicit targets that do match work (a subset)
    model = _load(tiny_model_dir("opt"))
    wlt.add_lora(model, RANK, ALPHA, targets=["q_proj"])
    assert len(wlt.lora_modules(model)) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_split_state_dict_and_adapter_files(family, tiny_model_dir, inputs, tmp_path):
    from safetensors.torch import load_file
    d = tiny_model_dir(family)
    model = _adapter_model(d)
    lora_logits = _logits(model, inputs)
    base = _load(d)
    base_keys = set(base.state_dict().keys())

    merged, adapter = wlt.split_lora_state_dict(model.state_dict(), model.wlt_lora)
    # merged: a plain HF state dict that reproduces the adapter model
    assert set(merged.keys()) == base_keys
    fresh = _load(d)
    fresh.load_state_dict(merged, strict=True)
    assert torch.allclose(_logits(fresh, inputs), lora_logits, rtol=0, atol=1e-5)

    # adapter: PEFT key names and shapes
    expected_keys = {f"base_model.model.{n}.lora_{x}.weight" for n in EXPECTED[family] for x in "AB"}
    assert set(adapter.keys()) == expected_keys
    for n in EXPECTED[family]:
        fan_in, fan_out = _in_out(base.get_submodule(n))
        assert tuple(adapter[f"base_model.model.{n}.lora_A.weight"].shape) == (RANK, fan_in)
        assert tuple(adapter[f"base_model.model.{n}.lora_B.weight"].shape) == (fan_out, RANK)

    # save + load on a fresh base model
    checkpoint.save_adapter(str(tmp_path), adapter, model.wlt_lora, d)
    adir = tmp_path / "adapter"
    assert sorted(os.listdir(adir)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((adir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA
    assert all(any(n == t or n.endswith("." + t) for t in cfg["target_modules"]) for n in EXPECTED[family])
    assert cfg["fan_in_fan_out"] is (family == "gpt2")
    on_disk = load_file(str(adir / "adapter_model.safetensors"))
    assert set(on_disk.keys()) == expected_keys
    for k in expected_keys:
        assert torch.equal(on_disk[k], adapter[k].cpu())

    loaded = checkpoint.load_adapter(_load(d), str(adir))
    assert torch.allclose(_logits(loaded, inputs), lora_logits, rtol=0, atol=1e-6)
    with wlt.lora_disabled(loaded):
        assert torch.equal(_logits(loaded, inputs), _logits(base, inputs))


def test_load_adapter_on_wrong_model_raises(tiny_model_dir, tmp_path):
    model = _adapter_model(tiny_model_dir("gpt2"))
    _, adapter = wlt.split_lora_state_dict(model.state_dict(), model.wlt_lora)
    checkpoint.save_adapter(str(tmp_path), adapter, model.wlt_lora, "gpt2")
    with pytest.raises(WltError):
        checkpoint.load_adapter(_load(tiny_model_dir("opt")), str(tmp_path / "adapter"))
    with pytest.raises(WltError):
        checkpoint.load_adapter(_load(tiny_model_dir("opt")), str(tmp_path))  # no adapter_config.json there


def test_load_adapter_rejects_extra_keys_and_regex_targets(tiny_model_dir, tmp_path):
    """An adapter with a tensor this model has no place for is an error, not silently ignored."""
    from safetensors.torch import load_file, save_file
    model = _adapter_model(tiny_model_dir("llama"))
    _, adapter = wlt.split_lora_state_dict(model.state_dict(), model.wlt_lora)
    checkpoint.save_adapter(str(tmp_path), adapter, model.wlt_lora, "llama")
    d = tmp_path / "adapter"
    checkpoint.load_adapter(_load(tiny_model_dir("llama")), str(d))  # as saved: fine
    sd = load_file(str(d / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(RANK, 32)
    save_file(sd, str(d / "adapter_model.safetensors"))
    with pytest.raises(WltError, match="unexpected"):
        checkpoint.load_adapter(_load(tiny_model_dir("llama")), str(d))
    cfg = json.load(open(d / "adapter_config.json"))
    cfg["target_modules"] = ".*proj"
    json.dump(cfg, open(d / "adapter_config.json", "w"))
    with pytest.raises(WltError, match="target_modules"):
        checkpoint.load_adapter(_load(tiny_model_dir("llama")), str(d))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_adapter(family, tiny_model_dir, inputs, tmp_path):
    """Optional: peft itself reads the saved adapter and matches the merged checkpoint."""
    peft = pytest.importorskip("peft")
    d = tiny_model_dir(family)
    model = _adapter_model(d)
    merged, adapter = wlt.split_lora_state_dict(model.state_dict(), model.wlt_lora)
    checkpoint.save_adapter(str(tmp_path), adapter, model.wlt_lora, d)
    merged_model = _load(d)
    merged_model.load_state_dict(merged, strict=True)
    want = _logits(merged_model, inputs)

    pm = peft.PeftModel.from_pretrained(_load(d), str(tmp_path / "adapter")).eval()
    n_lora = sum(1 for n, _ in pm.named_parameters() if "lora_B" in n)
    assert n_lora == len(EXPECTED[family])
    got = _logits(pm, inputs)
    assert (got - _logits(_load(d), inputs)).abs().max() > 1e-3, "peft did not apply the adapter"
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    # and peft's own merge agrees with ours
    unloaded = pm.merge_and_unload()
    assert torch.allclose(_logits(unloaded, inputs), want, rtol=0, atol=1e-5)
