"""The memory-lean log-prob kernel (wlt.response_logps, wlt.token_logps) and prompt sharing (wlt.pair_logps).

Every family the kernel knows (wlt.HEAD_POST) is built tiny from its config, with random non-zero biases, and compared with a
naive reference: the whole padded batch through the model in float64, a full log_softmax over the vocabulary,
gather. Values, and gradients of every parameter, must agree; so must the shared-prompt path (each pair packed
into one row, its prompt run once for both responses, short pairs sharing a row) with the plain one. The packed
layout is checked by hand against the drawing in wlt.py. The memory claim is checked directly: no tensor of
more than a chunk of rows x V is ever created, forward or backward.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import wlt
from lib import data
from lib.console import WltError

IGNORE = wlt.IGNORE

# model_type -> config overrides on top of COMMON (tiny: 2 layers, hidden 32)
KERNEL_FAMILIES = {
    "opt": dict(ffn_dim=64, word_embed_proj_dim=16, dropout=0.0),  # project_in / project_out around the body
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": {},
    "gpt_neo": dict(num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8),
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "gemma": dict(num_key_value_heads=2, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0),  # soft-capped logits
    "cohere": dict(num_key_value_heads=2, logit_scale=0.5),  # scaled logits
    "granite": dict(num_key_value_heads=2, logits_scaling=4.0),  # logits divided by a constant
}
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)

PAIRS = [
    {"prompt": "Human: How do I bake bread at home? Assistant:",
     "chosen": " Mix flour, water, salt and yeast, then let it rise.", "rejected": " No."},
    {"prompt": "sort: 7 3 9 1 =>", "chosen": " 1 3 7 9", "rejected": " 9 7 3 1 and some more words at the end"},
    {"prompt": "TL;DR:", "chosen": " keep it brief", "rejected": " say what matters first."},
    {"prompt": "Hi", "chosen": " hello", "rejected": " go"},  # short: packed into another pair's row
]


def build(family: str, vocab: int, attn: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=vocab, **COMMON,
                                                                  **KERNEL_FAMILIES.get(family, {})),
                                             **({"attn_implementation": attn} if attn else {}))
    with torch.no_grad():  # zero-initialised biases and norms would hide a missing bias or scale in the head
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def pairs(bpe_tokenizer):
    exs, _ = data.tokenize_pairs(bpe_tokenizer, PAIRS)
    assert len({len(e["prompt_ids"]) for e in exs}) == 4  # prompts of different lengths: left padding differs
    lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in exs]
    assert any(len(row) > 1 for row in wlt.pack_rows(lengths))  # packed, two pairs share a row
    return exs


def naive(model, batch, dtype=torch.float64):
    """[B] summed response log-probs: whole padded batch, full log_softmax over V, gather (float64 model)."""
    m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)  # fp32: gradients reach model
    logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    t = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits.to(dtype), -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    return (lp * (t != IGNORE)).sum(-1)


def close(got, ref):
    """Sums of log-probs agree to 1e-5 relative, plus a small absolute floor (the project's tolerance rule)."""
    got, ref = got.double(), ref.double()
    assert ((got - ref).abs() <= 1e-5 * ref.abs() + 1e-4).all(), f"\n got {got.tolist()}\n ref {ref.tolist()}"


def grads(model, fn) -> dict:
    model.zero_grad(set_to_none=True)
    fn().sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def same_grads(a: dict, b: dict):
    assert a.keys() == b.keys()
    scale = max(v.abs().max().item() for v in b.values())
    for n in b:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-5 * scale), n


@pytest.mark.parametrize("family", list(KERNEL_FAMILIES))
def test_lean_kernel_equals_full_softmax(family, bpe_tokenizer, pairs):
    model = build(family, len(bpe_tokenizer))
    assert wlt.head_of(model) is not None, "a known family fell back to the plain path"
    batch = wlt.collate_pairs(pairs, data.pad_id(bpe_tokenizer))
    with torch.no_grad():
        ref = naive(model, batch)
        got = wlt.response_logps(model, **batch)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    close(got, ref)
    # gradients of every parameter (the head's weight and bias included) against the fp32 full-softmax path
    same_grads(grads(model, lambda: wlt.response_logps(model, **batch)),
               grads(model, lambda: naive(model, batch, torch.float32)))


NO_SDPA = {"gpt_neo"}  # transformers has no SDPA attention for it


@pytest.mark.parametrize("family,attn", [(f, a) for f in sorted(wlt.PACK_FAMILIES & set(KERNEL_FAMILIES))
                                         for a in ("sdpa", "eager")])
def test_shared_prompt_equals_unshared(family, attn, bpe_tokenizer, pairs):
    """The prompt once, shared by both responses == two full sequences: each pair packed into one row, its
    rejected response masked from its chosen one, two of the four pairs sharing a row; SDPA takes the mask as
    it is, eager attention as an additive one."""
    model = build(family, len(bpe_tokenizer), attn)
    assert wlt.can_pack(model)
    pad = data.pad_id(bpe_tokenizer)
    batch = wlt.collate_pairs(pairs, pad)
    with torch.no_grad():
        ref = naive(model, batch)
        shared = wlt.pair_logps(model, pairs, pad, pack=True)
        plain = wlt.pair_logps(model, pairs, pad, pack=False)
    assert shared.shape == (len(pairs), 2)
    close(shared.t().reshape(-1), ref)  # collate_pairs: chosen rows, then rejected rows
    close(plain.t().reshape(-1), ref)
    # each pair alone (no padding, a row of its own) == the same pair inside the padded, packed batch
    with torch.no_grad():
        for i in range(len(pairs)):
            close(wlt.pair_logps(model, pairs[i:i + 1], pad, pack=True)[0], shared[i])
    # gradients flow through the shared prompt into its layers, as in the unshared forward
    same_grads(grads(model, lambda: wlt.pair_logps(model, pairs, pad, pack=True)),
               grads(model, lambda: wlt.pair_logps(model, pairs, pad, pack=False)))


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("opt", "sdpa"), ("gpt2", "sdpa")])
def test_packed_sft_sequences_equal_padded_ones(family, attn, bpe_tokenizer, pairs):
    """SFT's sequences (prompt + chosen) packed into rows without padding between them (pair_logps with one
    response a pair) == the same sequences right-padded through response_logps: values and gradients."""
    model = build(family, len(bpe_tokenizer), attn)
    pad = data.pad_id(bpe_tokenizer)
    seqs = wlt.collate([(e["prompt_ids"], e["chosen_ids"]) for e in pairs], pad)
    lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in pairs]
    assert any(len(row) > 1 for row in wlt.pack_rows(lengths))  # two sequences share a row
    with torch.no_grad():
        packed = wlt.pair_logps(model, pairs, pad, pack=True, responses=("chosen_ids",))
        assert packed.shape == (len(pairs), 1)
        close(packed[:, 0], wlt.response_logps(model, **seqs))
        close(packed[:, 0], naive(model, seqs))
    same_grads(grads(model, lambda: wlt.pair_logps(model, pairs, pad, pack=True, responses=("chosen_ids",))),
               grads(model, lambda: wlt.response_logps(model, **seqs)))


def test_sft_batch_whose_sequences_share_no_row_runs_padded(bpe_tokenizer, pairs):
    """With one response a pair and no two sequences sharing a row, packed rows would be the padded batch: pair_logps
    runs that batch as it is, bit for bit (so SFT's numbers, and launch.sh's table, stay those of padded rows)."""
    model = build("llama", len(bpe_tokenizer))
    pad = data.pad_id(bpe_tokenizer)
    two = pairs[:2]  # two sequences never share a row as long as the longer one
    assert len(wlt.pack_rows([len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in two])) == 2
    with torch.no_grad():
        packed = wlt.pair_logps(model, two, pad, pack=True, responses=("chosen_ids",))[:, 0]
        assert torch.equal(packed, wlt.response_logps(model, **wlt.collate_pairs(two, pad, ("chosen_ids",))))


def test_pack_rows_by_hand():
    """Rows as long as the longest pair (9), filled first fit, longest first: 9 | 5 + 4 | 3 + 2 (room 4 left)."""
    assert wlt.pack_rows([5, 9, 3, 4, 2]) == [[1], [0, 3], [2, 4]]
    assert wlt.pack_rows([3, 3]) == [[0], [1]]       # equal lengths: one a row, in file order
    assert wlt.pack_rows([4, 2, 2]) == [[0], [1, 2]]  # a row filled exactly


def test_pack_pairs_by_hand():
    """The drawing in wlt.py, worked out: pair a (prompt 10 11, chosen 20 21, rejected 30 31) fills row 0; pairs b
    (12 | 22 | 32) and c (13 | 23 | 33) share row 1. Positions restart at the prompt's end for each rejected
    response; each token sees the earlier tokens of its own pair, a rejected one never the chosen response."""
    pairs = [{"prompt_ids": [10, 11], "chosen_ids": [20, 21], "rejected_ids": [30, 31]},
             {"prompt_ids": [12], "chosen_ids": [22], "rejected_ids": [32]},
             {"prompt_ids": [13], "chosen_ids": [23], "rejected_ids": [33]}]
    inputs, (chosen, rejected) = wlt.pack_pairs(pairs, 0, "cpu")
    assert inputs["input_ids"].tolist() == [[10, 11, 20, 21, 30, 31], [12, 22, 32, 13, 23, 33]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3], [0, 1, 1, 0, 1, 1]]
    sees = [[[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 1, 4, 5]],   # row 0: a
            [[0], [0, 1], [0, 2], [3], [3, 4], [3, 5]]]                       # row 1: b, then c
    mask = inputs["attention_mask"]
    assert mask.shape == (2, 1, 6, 6)
    assert [[row.nonzero().flatten().tolist() for row in mask[r, 0]] for r in range(2)] == sees
    # the state before each response token predicts it (flat index row * 6 + column): a's chosen 20 21 by 11 20,
    # its rejected 30 by 11 (the prompt's last state) and 31 by 30; b's 22 and 32 by 12; c's 23 and 33 by 13
    states, targets, mask = chosen
    assert states.tolist() == [1, 2, 6, 9] and targets.tolist() == [20, 21, 22, 23]
    assert mask.sum(-1).tolist() == [2, 1, 1]  # tokens of a's, b's and c's chosen response
    states, targets, mask = rejected
    assert states.tolist() == [1, 4, 6, 9] and targets.tolist() == [30, 31, 32, 33]
    assert mask.sum(-1).tolist() == [2, 1, 1]


def test_activation_checkpointing_recomputes_packed_rows(bpe_tokenizer, pairs):
    """A packed row has no KV cache for a recomputed block to write twice: prompt sharing and activation
    checkpointing go together, under SDPA and eager attention, with the gradients of whole sequences."""
    from lib.dist import enable_activation_checkpointing
    pad = data.pad_id(bpe_tokenizer)
    for attn in ("sdpa", "eager"):
        model = build("llama", len(bpe_tokenizer), attn)
        plain = grads(model, lambda: wlt.pair_logps(model, pairs, pad, pack=False))
        enable_activation_checkpointing(model)
        model.train()  # checkpointing recomputes only in training mode (dropout is 0 in this model)
        same_grads(grads(model, lambda: wlt.pair_logps(model, pairs, pad, pack=True)), plain)


def test_default_sharing_follows_the_family(bpe_tokenizer, pairs):
    from lib.models import pack_setting
    llama = build("llama", len(bpe_tokenizer))
    assert wlt.can_pack(llama) and pack_setting("auto", llama) and not pack_setting("off", llama)
    gemma2 = build("gemma2", len(bpe_tokenizer))  # a sliding-window family: its window would not hold in a given mask
    assert not wlt.can_pack(gemma2) and not pack_setting("auto", gemma2)
    with pytest.raises(WltError, match="--share-prompt on: model type 'gemma2' with 'eager' attention cannot pack"):
        pack_setting("on", gemma2)
    with pytest.raises(ValueError, match="packing is not supported"):
        wlt.pair_logps(gemma2, pairs, 0, pack=True)


def test_sliding_window_longer_than_a_pair_runs_whole_sequences(bpe_tokenizer, pairs):
    """Mistral's sliding window: a pair longer than the window is not packed (a given mask would lift the
    window), so its numbers are those of the whole sequences with the window applied."""
    from transformers import AutoConfig, AutoModelForCausalLM
    longest = max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in pairs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mistral", vocab_size=len(bpe_tokenizer), **COMMON, num_key_value_heads=2, sliding_window=4)).eval()
    assert longest > 4
    batch = wlt.collate_pairs(pairs, data.pad_id(bpe_tokenizer))
    with torch.no_grad():
        close(wlt.pair_logps(model, pairs, data.pad_id(bpe_tokenizer)).t().reshape(-1), naive(model, batch))


class MaxVocabTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns whose last dimension is V
    (views of the model's own parameters, such as the head's W^T, are not activations and are left out)."""

    def __init__(self, vocab: int, model):
        super().__init__()
        self.vocab, self.largest = vocab, 0
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab \
                    and t.untyped_storage().data_ptr() not in self.params:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_no_full_logits_forward_or_backward(family, bpe_tokenizer, pairs, monkeypatch):
    """With the chunk set to 4 rows, no op creates a [*, V] tensor of more than 4 rows, while the batch has
    dozens of response tokens (the plain path makes [2B, T, V])."""
    V = len(bpe_tokenizer)
    model = build(family, V)
    model.get_input_embeddings().weight.requires_grad_(False)  # [V, H] parameters are not activations:
    model.get_output_embeddings().weight.requires_grad_(False)  # keep their gradients out of the count
    monkeypatch.setattr(wlt, "LOGPS_CHUNK", 4 * V)
    batch = wlt.collate_pairs(pairs, data.pad_id(bpe_tokenizer))
    n_resp = int((batch["labels"] != IGNORE).sum())
    assert n_resp > 30
    with MaxVocabTensor(V, model) as seen:
        out = wlt.pair_logps(model, pairs, data.pad_id(bpe_tokenizer))
        out.sum().backward()
    assert 0 < seen.largest <= 4 * V, seen.largest
    with MaxVocabTensor(V, model) as plain:
        wlt.response_logps_plain(model, **batch).sum().backward()
    assert plain.largest >= batch["input_ids"].numel() // 2 * V  # the plain path does make them


def test_unknown_family_falls_back_with_one_warning(bpe_tokenizer, capsys):
    """A family outside wlt.HEAD_POST (BLOOM here) takes the plain full-logits path: the same numbers, and one
    line before the work (lib.models.warn_plain_path) that says so and how large the logits are."""
    from transformers import BloomConfig, BloomForCausalLM
    from lib import models
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, n_layer=2, n_head=4)).eval()
    exs, _ = data.tokenize_pairs(bpe_tokenizer, PAIRS)
    batch = wlt.collate_pairs(exs, data.pad_id(bpe_tokenizer))
    assert wlt.head_of(model) is None and not wlt.can_pack(model)
    for _ in range(2):
        models.warn_plain_path(model, 8, 512)
    with torch.no_grad():
        a = wlt.response_logps(model, **batch)
        b = wlt.pair_logps(model, exs, data.pad_id(bpe_tokenizer))
        close(a, naive(model, batch))
    close(b.t().reshape(-1), a)
    out = capsys.readouterr().out
    assert out.count("not known to the memory-lean log-prob kernel") == 1
    assert f"about {8 * 512 * len(bpe_tokenizer) * 8 / 2 ** 20:,.0f} MiB for 8 sequences of 512 tokens" in out


def test_token_logps_softcap_and_scale_by_hand():
    """Two rows, three-word vocabulary, hand-computed: z = c * tanh(s * (h W^T + b) / c); log softmax(z)[y]."""
    h = torch.tensor([[1.0, 0.0], [0.5, -1.0]])
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([0.0, 0.5, -0.5])
    y = torch.tensor([0, 2])
    head = {"weight": W, "bias": b, "scale": 0.5, "softcap": 2.0}
    # row 0: u = 0.5 * [2, 0.5, 0.5] = [1, 0.25, 0.25];  row 1: u = 0.5 * [1, -0.5, -1] = [0.5, -0.25, -0.5]
    import math
    want = []
    for u, t in (([1.0, 0.25, 0.25], 0), ([0.5, -0.25, -0.5], 2)):
        z = [2.0 * math.tanh(x / 2.0) for x in u]
        want.append(z[t] - math.log(sum(math.exp(v) for v in z)))
    got = wlt.token_logps(h, head, y, chunk=3)  # one row per chunk
    assert got.tolist() == pytest.approx(want, abs=1e-6)
