"""wlt: the method of "Your Weak LLM is Secretly a Strong Teacher for Alignment" (Tao & Li, ICLR 2025,
arXiv 2409.08813), in the order of the paper, and nothing else.

    Eq. 1  Bradley-Terry preferences ......... preference_probability
    Eq. 2  the KL-regularised objective, and the quantity every later equation is made of, log pi(y|x):
           response_logps_plain (the definition), response_logps (the same number, memory-lean),
           pair_logps (both responses of a pair, the prompt run once)
    Eq. 3  DPO ................................ dpo_loss (sigmoid = DPO, with label smoothing = cDPO; ipo; hinge)
    SFT    the reference policies ............. sft_loss
    Eq. 4  the weak teacher: DPO on D_l ....... (train_dpo.py --teacher)
    Eq. 5  the weak teacher's reward and label  implicit_reward, weak_labels, text_tie_break
    Eq. 6  the student: DPO on weak labels .... (train_dpo.py --student --labels weak)
    LoRA   (Hu et al. 2021) ................... LoRALinear, add_lora, lora_disabled, merge_lora,
                                                split_lora_state_dict (the PEFT library's key names)

Shapes: B pairs or sequences, T tokens, H hidden size, V vocabulary. Log-probs are fp32 sums over the
response tokens (EOS included, no length normalisation). Files, flags, processes and checkpoints live in
lib/; the scripts (train_sft.py, train_dpo.py, label.py, evaluate.py) put the two together.
`python wlt.py prepare|estimate` hands off to lib/commands.py.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # label of the positions that are not response tokens (prompt and padding)


class WltError(Exception):
    """A user-facing error: the scripts print its message on one line and exit 1, without a traceback."""


_warned: set = set()


def warn_once(key, msg: str) -> None:
    """Print a warning once per key, from the first process only (RANK 0 under torchrun)."""
    if key not in _warned:
        _warned.add(key)
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Eq. 1  Bradley-Terry preferences: a human prefers y1 to y2 with probability
#            P(y1 > y2 | x) = sigmoid(r(x, y1) - r(x, y2)),
#        and RLHF fits a reward model r by maximising the log-likelihood of the human labels under it. DPO
#        (Eq. 3) is the same likelihood with the implicit reward of the policy being trained in place of r: the
#        teacher's in Eq. 4, the student's in Eq. 6. The synthetic world's simulated annotators are this model of
#        an exact gold reward (lib/synthetic.py).


def preference_probability(reward_margin: float) -> float:
    """P(y1 > y2 | x) for reward_margin = r(x, y1) - r(x, y2): the logistic sigmoid, written in the form that
    cannot overflow (exp of a non-positive number) for margins of any size."""
    if reward_margin >= 0:
        return 1 / (1 + math.exp(-reward_margin))
    e = math.exp(reward_margin)
    return e / (1 + e)


# ----------------------------------------------------------------------------------------------------------
# Eq. 2  The policy maximises E[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x)). Its optimum is
#        pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) +
#        beta log Z(x): every later equation is made of log pi(y|x), the sum over the response tokens y_t of
#        log p(y_t | x, y_<t). It is computed here three ways: the definition (response_logps_plain), the
#        same number without ever building the [B, T, V] logits (response_logps), and for a preference
#        pair with the prompt run once for both responses (pair_logps).


def pad_batch(seqs: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention_mask), both [B, max length]: padded on the right, or on the left so that
    every sequence ends in the last column (prompts continued by a KV cache)."""
    B, T = len(seqs), max(map(len, seqs))
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def collate(seqs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """(prompt_ids, response_ids) sequences -> input_ids, attention_mask, labels, each [B, T], right-padded.
    labels = input_ids on the response tokens, IGNORE on prompt and padding: they say what log pi(y|x) sums."""
    T = max(len(p) + len(r) for p, r in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(exs: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Tokenized pairs (prompt_ids, chosen_ids, rejected_ids) -> one batch of 2B sequences: the B chosen
    sequences, then the B rejected ones, so that both go through one forward."""
    seqs = [(e["prompt_ids"], e["chosen_ids"]) for e in exs] + [(e["prompt_ids"], e["rejected_ids"]) for e in exs]
    return collate(seqs, pad)


def response_logps_plain(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) by its definition. input_ids, attention_mask, labels: [B, T] -> [B] fp32.

    The logits at position t predict token t + 1; log-softmax in fp32 (bf16 sums over hundreds of tokens lose
    digits); the labels keep the response tokens only."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]                                                     # [B, T-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (targets != IGNORE)).sum(-1)


# The memory-lean kernel. The definition above builds [B, T, V] fp32 logits and a log-softmax of the same size
# (and, in training, gradients of both): with V ~ 50k that is most of the memory, and prompt positions (~70%
# of HH-RLHF tokens) pay for a projection nobody reads. Below, the model's body runs as usual and only the
# hidden states that predict a response token reach the output head, in chunks, inside an autograd function
# that recomputes each chunk's logits in backward: at no time does a [B, T, V] or [N, V] tensor exist, only
# [chunk, V]. tests/test_kernel.py checks it against the definition, values and gradients, for 11 families.

LOGPS_CHUNK = 2 ** 23  # elements of the largest logits block, [chunk rows, V] (32 MB in fp32)

# Families whose causal-LM forward is  logits = post(lm_head(base_model(...).last_hidden_state)), post one of:
# None, ("softcap", config key) -> c * tanh(z / c), ("mul", key) -> z * s, ("div", key) -> z / s. Read off the
# transformers source; any other model_type takes the plain path (one warning).
HEAD_POST = {t: None for t in ("opt", "gpt2", "gpt_neox", "gpt_neo", "gptj", "llama", "mistral", "mixtral",
                                 "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "smollm3", "starcoder2")}
HEAD_POST.update({"gemma2": ("softcap", "final_logit_softcapping"),
                  "gemma3_text": ("softcap", "final_logit_softcapping"),
                  "cohere": ("mul", "logit_scale"), "granite": ("div", "logits_scaling")})


def head_of(model) -> dict | None:
    """What the kernel needs from a model's output head: {"weight": [V, H], "bias": [V] or None, "scale",
    "softcap"}; None for a family outside HEAD_POST (plain path)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if kind not in HEAD_POST or not isinstance(head, nn.Linear):
        warn_once(kind, f"model type {kind!r} is not known to the memory-lean log-prob kernel; using the plain "
                        f"path (full [B, T, V] logits)")
        return None
    post, scale, softcap = HEAD_POST[kind], 1.0, None
    if post is not None:
        value = getattr(cfg, post[1], None)
        if post[0] == "softcap":
            softcap = value
        elif value is not None:
            scale = float(value) if post[0] == "mul" else 1.0 / float(value)
    return {"weight": head.weight, "bias": head.bias, "scale": scale, "softcap": softcap}


def _chunk_logits(h: torch.Tensor, weight, bias, scale: float, softcap) -> torch.Tensor:
    """[n, H] -> fp32 logits z = post(scale * (h W^T + b)), [n, V]."""
    u = F.linear(h, weight, bias).float()
    if scale != 1.0:
        u = u * scale
    return softcap * torch.tanh(u / softcap) if softcap else u


class _TokenLogps(torch.autograd.Function):
    """log softmax(post(scale * (h W^T + b)))[target] per row, `rows` rows at a time (see token_logps)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, bias, targets, scale, softcap, rows):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):
            z = _chunk_logits(h[s:s + rows], weight, bias, scale, softcap)
            out[s:s + rows] = z.gather(1, targets[s:s + rows, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(h, weight, bias, targets)  # the inputs only: each chunk's logits are recomputed
        ctx.scale, ctx.softcap, ctx.rows = scale, softcap, rows
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        h, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for s in range(0, h.shape[0], ctx.rows):
            hs, g = h[s:s + ctx.rows], grad_out[s:s + ctx.rows].float()
            z = _chunk_logits(hs, weight, bias, ctx.scale, ctx.softcap)
            # d out / d z = onehot(target) - softmax(z), times the incoming gradient
            dz = torch.softmax(z, dim=-1).mul_(-g[:, None])
            dz.scatter_add_(1, targets[s:s + ctx.rows, None], g[:, None])
            if ctx.softcap:  # z = c tanh(u / c)  ->  dz/du = 1 - (z / c)^2
                dz.mul_(1 - (z / ctx.softcap) ** 2)
            if ctx.scale != 1.0:
                dz.mul_(ctx.scale)
            if need_h:
                gh[s:s + ctx.rows] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                gw += dz.t().to(hs.dtype) @ hs
            if need_b:
                gb += dz.sum(0)
        return (gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None,
                None, None, None, None)


def token_logps(hidden: torch.Tensor, head: dict, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """log p(target | hidden) at N selected positions: hidden [N, H] (each the state that predicts its target),
    targets [N] -> [N] fp32, p the model's own output distribution (head_of). A full log_softmax's numbers up to
    fp32 rounding (logit - logsumexp, not the same float operations: a few ulps apart), computed [chunk / V rows,
    V] at a time, forward and backward."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    rows = max(1, (chunk or LOGPS_CHUNK) // head["weight"].shape[0])
    return _TokenLogps.apply(hidden, head["weight"], head["bias"], targets, head["scale"], head["softcap"], rows)


def _summed_logps(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, head: dict) -> torch.Tensor:
    """pred [B, T, H]: the hidden state that predicts targets [B, T] at each position; mask [B, T] bool: the
    response tokens. -> [B]: the summed log-probs of the masked targets (only those reach the head)."""
    rows, cols = mask.nonzero(as_tuple=True)
    lp = token_logps(pred[rows, cols], head, targets[rows, cols])
    return torch.zeros(pred.shape[0], dtype=torch.float32, device=lp.device).index_add(0, rows, lp)


def _as_forward(model, fn, *args):
    """Run fn(model, *args) as a forward of the model. The lean kernel runs the model's body, then reaches
    into its output head; a sharded model (FSDP2) gathers the head's weights only inside a forward, so
    lib/dist.py gives it a `wlt_forward` method registered as one. Elsewhere this is fn(model, *args)."""
    fwd = getattr(model, "wlt_forward", None)
    return fwd(fn, *args) if fwd is not None else fn(model, *args)


def _lean_response_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    head = head_of(model)
    if head is None:
        return response_logps_plain(model, input_ids, attention_mask, labels)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]                                         # position t predicts token t + 1
    return _summed_logps(hidden[:, :-1], targets, targets != IGNORE, head)


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x): response_logps_plain's number without its [B, T, V] logits. [B, T] x 3 -> [B] fp32.
    Families outside HEAD_POST take the plain path."""
    return _as_forward(model, _lean_response_logps, input_ids, attention_mask, labels)


# Prompt sharing. A pair's two responses continue the same prompt: run the prompt once, then both responses
# on top of its KV cache, P + Rc + Rr tokens through the body instead of 2P + Rc + Rr. Families whose
# positions can be passed explicitly (left padding must not shift them); sliding-window and hybrid caches
# (Gemma-2/3) are left out. Tested against the unshared computation, values and gradients.
SHARE_PROMPT = {"opt", "gpt2", "gpt_neox", "gpt_neo", "llama", "mistral", "qwen2", "qwen3", "gemma"}


@functools.lru_cache(maxsize=None)
def _kv_cache_kwarg(forward_owner: type) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def kv_cache_kwarg(module) -> str:
    """The keyword under which `module`'s forward takes a KV cache: `cache` in transformers 5.x (where
    `past_key_values` is deprecated), `past_key_values` before."""
    return _kv_cache_kwarg(type(module))


def kv_cache_of(output):
    """The KV cache a forward with use_cache=True returned (`cache` in transformers 5.x, `past_key_values` before)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


def _shared_pair_logps(model, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
                       pad: int) -> torch.Tensor:
    head = head_of(model)
    dev = head["weight"].device
    # 1. the prompts, left-padded so that every prompt ends in the last column, once per pair
    ids, pmask = (t.to(dev) for t in pad_batch(prompts, pad, left=True))
    pos = (pmask.cumsum(-1) - 1).clamp(min=0)  # explicit positions: left padding must not shift them
    out = model.base_model(input_ids=ids, attention_mask=pmask, position_ids=pos, use_cache=True)
    cache = kv_cache_of(out)
    cache.batch_repeat_interleave(2)           # rows: pair 0 chosen, pair 0 rejected, pair 1 chosen, ...
    # 2. both responses of every pair on top of its cached prompt, right-padded
    rids, rmask = (t.to(dev) for t in pad_batch([r for pair in zip(chosen, rejected) for r in pair], pad))
    rpos = pmask.sum(-1).repeat_interleave(2)[:, None] + torch.arange(rids.shape[1], device=dev)
    hid = model.base_model(input_ids=rids, attention_mask=torch.cat([pmask.repeat_interleave(2, 0), rmask], 1),
                           position_ids=rpos, use_cache=True, **{kv_cache_kwarg(model.base_model): cache}).last_hidden_state
    # 3. response token j is predicted by the last prompt state (j = 0) or by response state j - 1
    pred = torch.cat([out.last_hidden_state[:, -1:].repeat_interleave(2, 0), hid[:, :-1]], dim=1)  # [2B, R, H]
    logps = _summed_logps(pred, rids, rmask.bool(), head)          # [2B]: chosen, rejected, chosen, ...
    return torch.stack([logps[0::2], logps[1::2]], dim=-1)        # [B, 2], a new tensor: FSDP2 hooks need one


# Packing. The cache path above pads every prompt of a batch to the longest prompt and all 2B responses to the
# longest response: on multi-turn HH-RLHF prompts (14 to 388 tokens) that padding ate the sharing's saving.
# Packed, a pair is one segment, prompt + chosen + rejected, whose rejected tokens see the prompt and each other
# but not the chosen ones, their positions restarting where the prompt ends: the inputs of the cache path's
# attention, in one forward. Segments share rows no longer than the batch's longest pair (first fit, longest
# first), each seeing only itself, so that two short pairs fill the row one long pair needs instead of two
# padded rows. It needs an attention that applies a given [R, 1, T, T] mask as is: PyTorch's SDPA
# (transformers' default); eager and flash-attention take the cache path.


def can_pack(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """Indices of the pairs in each row: rows as long as the longest pair, filled first fit, longest first."""
    width, rows, room = max(lengths), [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # a stable sort: ties keep file order
        r = next((r for r, left in enumerate(room) if lengths[i] <= left), None)
        if r is None:  # no row has room left for it: open one
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def _packed_pair_logps(model, exs: list[dict], pad: int) -> torch.Tensor:
    head = head_of(model)
    dev = head["weight"].device
    lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in exs]
    packing = pack_rows(lengths)
    R, T = len(packing), max(lengths)
    ids = torch.full((R, T), pad, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    sees = torch.eye(T, dtype=torch.bool).repeat(R, 1, 1)  # [R, T, T]; a padding position sees itself
    rows, cols, targets, which = [], [], [], []  # the state predicting each response token, and its pair/side
    for row, members in enumerate(packing):
        o = 0  # where the segment starts in its row
        for i in members:
            e = exs[i]
            p, c, r = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            ids[row, o:o + p + c + r] = torch.tensor(e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"])
            pos[row, o:o + p + c] = torch.arange(p + c)
            pos[row, o + p + c:o + p + c + r] = torch.arange(p, p + r)  # the rejected response continues the prompt
            sees[row, o:o + p + c, o:o + p + c] = torch.ones(p + c, p + c, dtype=torch.bool).tril()
            sees[row, o + p + c:o + p + c + r, o:o + p] = True          # the prompt, not the chosen response
            sees[row, o + p + c:o + p + c + r, o + p + c:o + p + c + r] = torch.ones(r, r, dtype=torch.bool).tril()
            rows += [row] * (c + r)
            # chosen token j is predicted by state p-1+j; rejected token 0 by the last prompt state, j by p+c+j-1
            cols += [o + k for k in list(range(p - 1, p + c - 1)) + [p - 1] + list(range(p + c, p + c + r - 1))]
            targets += e["chosen_ids"] + e["rejected_ids"]
            which += [2 * i] * c + [2 * i + 1] * r
            o += p + c + r
    hid = model.base_model(input_ids=ids.to(dev), attention_mask=sees[:, None].to(dev), position_ids=pos.to(dev),
                           use_cache=False).last_hidden_state
    lp = token_logps(hid[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)], head,
                     torch.tensor(targets, device=dev))
    logps = torch.zeros(2 * len(exs), dtype=torch.float32, device=dev).index_add(0, torch.tensor(which, device=dev), lp)
    return torch.stack([logps[0::2], logps[1::2]], dim=-1)        # [B, 2]


def _pair_logps(model, exs: list[dict], pad: int, share: bool) -> torch.Tensor:
    if share and can_pack(model):
        return _packed_pair_logps(model, exs, pad)
    if share:
        return _shared_pair_logps(model, [e["prompt_ids"] for e in exs], [e["chosen_ids"] for e in exs],
                                  [e["rejected_ids"] for e in exs], pad)
    dev = next(model.parameters()).device
    b = {k: v.to(dev) for k, v in collate_pairs(exs, pad).items()}
    return torch.stack(_lean_response_logps(model, **b).chunk(2), dim=-1)


def can_share_prompt(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in SHARE_PROMPT and head_of(model) is not None


def pair_logps(model, exs: list[dict], pad: int, share_prompt: bool | None = None) -> torch.Tensor:
    """[B, 2]: log pi(chosen | x), log pi(rejected | x) of B tokenized pairs (prompt_ids, chosen_ids,
    rejected_ids). share_prompt (default: when the family allows it) runs each prompt once for both responses;
    the same numbers as response_logps on collate_pairs, up to float rounding, with or without gradients."""
    if share_prompt is None:
        share_prompt = can_share_prompt(model)
    elif share_prompt and not can_share_prompt(model):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise WltError(f"prompt sharing is not supported for model type {kind!r} (supported: "
                       f"{', '.join(sorted(SHARE_PROMPT))}); use --share-prompt off or auto")
    return _as_forward(model, _pair_logps, exs, pad, share_prompt)


# ----------------------------------------------------------------------------------------------------------
# Eq. 3  DPO (Rafailov et al. 2023, their equation 7): put the implicit reward r = beta log(pi / pi_ref) into
#        the Bradley-Terry likelihood above and fit the policy directly:
#            L = -E log sigmoid(beta log(pi(y_w|x) / pi_ref(y_w|x)) - beta log(pi(y_l|x) / pi_ref(y_l|x)))
#        Its relatives share the log-ratio difference h below and differ in the function of h they minimise.


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference losses on log-probs. Inputs [B] each -> (losses [B], chosen_rewards [B], rejected_rewards [B]);
    the rewards (implicit_reward) are detached. y_w = chosen, y_l = rejected.

        h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))      so r_w - r_l = beta h
        sigmoid  -log sigmoid(beta h)                                          DPO, the paper's loss
                 with label_smoothing eps, the labels assumed flipped with probability eps (conservative DPO):
                 -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        ipo      (h - 1 / (2 beta))^2         Azar et al. 2023, their tau = beta. On whatever log-probs it is
                 given: summed ones as written (train_dpo.py --loss-type ipo), or per-token means as TRL's
                 implementation does (--loss-type ipo-mean, see per_token_mean)
        hinge    max(0, 1 - beta h)           the SLiC-HF calibration loss (Zhao et al. 2023) on the DPO h
    """
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type!r}")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (sigmoid, ipo, hinge)")
    chosen_rewards = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach()
    return losses, chosen_rewards, rejected_rewards


def per_token_mean(logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Summed log-probs [B] -> per-token means [B] (num_tokens [B]: response tokens, EOS included): the
    length-normalised log-probs that TRL's IPO works on."""
    return logps / num_tokens


# ----------------------------------------------------------------------------------------------------------
# SFT  Both reference policies are the base model fine-tuned on the chosen responses of D_l (the paper's
#      first step for the teacher and for the student): maximum likelihood of the response tokens.


def sft_loss(logps: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """Summed response-token NLL over the number of response tokens of the *global* batch. logps: [B] summed
    response log-probs of this micro-batch (response_logps); num_tokens: response tokens in the whole global
    batch, so that micro-batches and processes add up to the plain token mean."""
    return -logps.sum() / num_tokens


# ----------------------------------------------------------------------------------------------------------
# Eq. 4  The weak teacher pi_w: DPO of the small model on the human-labeled D_l, from pi_ref = its SFT
#        model. train_dpo.py --teacher. Nothing new to compute: dpo_loss over D_l.


# ----------------------------------------------------------------------------------------------------------
# Eq. 5  The weak teacher's reward of a response,  r(x, y) = beta log(pi_w(y|x) / pi_ref(y|x)),  and its label:
#        of the two responses of an unlabeled pair, the one with the higher reward is "chosen". label.py is
#        these two functions applied to pair_logps of pi_w and of pi_ref.


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)). [B], [B] -> [B]. (The partition term beta log Z(x) of
    the KL-regularised optimum is the same for both responses of a prompt, so it cancels in every comparison
    and is left out.)"""
    return beta * (policy_logps - ref_logps)


def weak_labels(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """[B] bool: True when the weak teacher prefers the input's "chosen" response (the higher reward).
    Inputs [B] rewards; tie_break [B] bool, the answer on an exact tie (text_tie_break). The input order is the
    human label: breaking ties by it would let a teacher that cannot tell two responses apart (pi_w == pi_ref,
    say) copy the human labels."""
    return torch.where(chosen_rewards == rejected_rewards, tie_break, chosen_rewards > rejected_rewards)


def text_tie_break(chosen: str, rejected: str) -> bool:
    """The answer to an exact tie (True: the input's chosen wins). A fixed hash of the unordered pair of texts
    picks the winning text, so the label does not depend on the order the humans gave: swapping chosen and
    rejected in the input names the same winner."""
    first, second = sorted((chosen, rejected))
    first_wins = hashlib.sha256((first + "\0" + second).encode()).digest()[0] < 128
    return first_wins == (chosen == first)


# ----------------------------------------------------------------------------------------------------------
# Eq. 6  The student pi_weak: DPO of the bigger model on D_u labeled by the weak teacher, from its own SFT model.
#        train_dpo.py --student --labels weak; the control pi_human is the same run on D_u's human labels
#        (--labels human).


# ----------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021), the paper's DPO setting (rank 8):  y = x W^T + b + (alpha / r) B A x,  with B = 0 at
# the start so that a fresh adapter is the base model, and the base model is pi_ref whenever the adapter is off.

# Default target modules per model family (config.model_type), matched by name suffix as PEFT matches them:
# every linear map of attention and MLP ("all-linear"); the output head and the embeddings are left out.
LORA_TARGETS = {
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: weights stored transposed (fan_in_fan_out)
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
}
for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2"):
    LORA_TARGETS[_t] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS["phi3"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # fused q|k|v and gate|up maps


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear, or GPT-2's transposed Conv1D) plus a low-rank update.

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T,   A: [rank, in], B: [out, rank], B = 0 at init.
    `weight` and `bias` are the base layer's own Parameters under their own names, so the state dict keeps the
    model's keys; the adapter adds `<path>.lora_A.weight` and `<path>.lora_B.weight`.
    `disabled = True` switches the update off: the same module then computes the base layer (pi_ref).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # transformers' Conv1D: weight is [in, out]
        self.weight = base.weight
        self.bias = base.bias
        in_f, out_f = (self.weight.shape if self.fan_in_fan_out else self.weight.shape[::-1])
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Linear(in_f, rank, bias=False, device=self.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_f, bias=False, device=self.weight.device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_lora()

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        y = F.linear(x, w, self.bias)
        if self.disabled:
            return y
        a, b = self.lora_A.weight, self.lora_B.weight
        update = F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scaling
        return y + update.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight update of a LoRA pair in the base weight's layout: scaling * B @ A ([out, in]), transposed for
    Conv1D ([in, out])."""
    d = (lora_B.float() @ lora_A.float()) * scaling
    return d.t() if fan_in_fan_out else d


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets: list[str] | None = None):
    """Replace the target linear layers of `model` by LoRALinear and freeze everything else. Returns the model.

    targets: module-name suffixes (PEFT's matching rule); default LORA_TARGETS[config.model_type]. The adapter's
    settings are recorded as model.wlt_lora, for saving and merging. A is random: seed before calling it."""
    from transformers.pytorch_utils import Conv1D
    if targets is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in LORA_TARGETS:
            raise WltError(f"no default LoRA targets for model type {mt!r}; pass --lora-targets "
                           f"(known: {', '.join(sorted(LORA_TARGETS))})")
        targets = LORA_TARGETS[mt]
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = []
    for name, module in list(model.named_modules()):
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
        replaced.append(name)
    if not replaced:
        raise WltError(f"LoRA targets {targets} match no linear layer of this model")
    fan = {n: model.get_submodule(n).fan_in_fan_out for n in replaced}  # per module: Conv1D or nn.Linear
    model.wlt_lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
                      "fan_in_fan_out": any(fan.values()), "modules": fan}
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Within this block every LoRALinear computes its base layer only: the same model acts as pi_ref."""
    mods = lora_modules(model)
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (nn.Linear or Conv1D), in place.
    Returns the model: a plain HF model with the adapter's effect built in."""
    from transformers.pytorch_utils import Conv1D
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        w = module.weight
        w += lora_delta(module.lora_A.weight, module.lora_B.weight, module.scaling, module.fan_in_fan_out).to(w.dtype)
        if module.fan_in_fan_out:
            plain = Conv1D(module.out_features, module.in_features)
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight = w
        plain.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    if hasattr(model, "wlt_lora"):
        del model.wlt_lora
    return model


def split_lora_state_dict(sd: dict, lora_cfg: dict) -> tuple[dict, dict]:
    """A LoRA model's full state dict -> (the merged plain state dict, the adapter's state dict). lora_cfg:
    model.wlt_lora. The adapter keys are the PEFT library's, base_model.model.<module path>.lora_A.weight, so
    that peft loads the adapter as it is (lib/checkpoint.py writes it with PEFT's adapter_config.json)."""
    merged, adapter = {}, {}
    scaling = lora_cfg["lora_alpha"] / lora_cfg["r"]
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            adapter["base_model.model." + k] = v.contiguous()
        else:
            merged[k] = v
    for path, fan in lora_cfg["modules"].items():  # fan: the layer stores its weight transposed (Conv1D)
        a, b = sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"]
        w = merged[f"{path}.weight"]
        merged[f"{path}.weight"] = (w.float() + lora_delta(a, b, scaling, fan)).to(w.dtype)
    return merged, adapter


if __name__ == "__main__":  # `python wlt.py prepare|estimate ...`: the commands live with the plumbing
    from lib.commands import main
    main()
