"""wlt: the method of "Your Weak LLM is Secretly a Strong Teacher for Alignment" (Tao & Li, ICLR 2025,
arXiv 2409.08813), in the paper's order, and nothing else: no files, flags, processes or checkpoints (lib/ holds
those; the scripts train_sft.py, train_dpo.py, label.py and evaluate.py put the two together).

    Eq. 1  Bradley-Terry preferences ............ preference_probability
    Eq. 2  log pi(y|x), what every later equation is made of:
             its definition ...................... response_logps_plain
             the same number, memory-lean ........ response_logps (token_logps: the head only where a response
                                                   token is predicted)
             both responses of a pair ............ pair_logps (the prompt run once, pairs packed into rows:
                                                   pack_pairs draws a row)
    Eq. 3  DPO .................................. dpo_loss (sigmoid = DPO, with label smoothing = cDPO; ipo; hinge)
    SFT    the reference policies ............... sft_loss
    Eq. 4  the weak teacher: Eq. 3 on D_l ....... (train_dpo.py --teacher)
    Eq. 5  the weak reward and label ............ implicit_reward, prefers_first, text_tie_break
    Eq. 6  the student: Eq. 3 on weak labels .... (train_dpo.py --student --labels weak)
    LoRA   (Hu et al. 2021) ..................... LoRALinear, add_lora, lora_disabled, merge_lora, split_lora_state_dict

Shapes: B pairs or sequences, T tokens, H hidden size, V vocabulary. Log-probs are fp32 sums over the response
tokens (EOS included, no length normalisation).
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # label of the positions that are not response tokens (prompt and padding)


# ----------------------------------------------------------------------------------------------------------
# Eq. 1  Bradley-Terry preferences: a human prefers y1 to y2 with probability
#            P(y1 > y2 | x) = sigmoid(r(x, y1) - r(x, y2)),
#        and RLHF fits a reward model r by maximising the log-likelihood of the human labels under it. DPO
#        (Eq. 3) is the same likelihood with the implicit reward of the policy being trained in place of r: the
#        teacher's in Eq. 4, the student's in Eq. 6. The synthetic world's simulated annotators draw their labels
#        from this model of an exact gold reward (lib/synthetic.py).


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
#        log p(y_t | x, y_<t). First its definition; then the same number computed faster (the speed path).


def pad_batch(seqs: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention_mask), both [B, max length]: padded on the right, or on the left so that
    every sequence ends in the last column (prompts continued by a KV cache when sampling)."""
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
    ids, mask = pad_batch([p + r for p, r in seqs], pad)
    labels = torch.full_like(ids, IGNORE)
    for i, (p, r) in enumerate(seqs):
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


RESPONSES = ("chosen_ids", "rejected_ids")  # a pair's responses, in the order pair_logps returns them


def collate_pairs(pairs: list[dict], pad: int, responses=RESPONSES) -> dict[str, torch.Tensor]:
    """Tokenized pairs (prompt_ids, chosen_ids, rejected_ids) -> one batch of 2B sequences: the B chosen
    sequences, then the B rejected ones, so that both go through one forward (B sequences with
    responses=("chosen_ids",): SFT's)."""
    return collate([(e["prompt_ids"], e[key]) for key in responses for e in pairs], pad)


def response_logps_plain(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) by its definition. input_ids, attention_mask, labels: [B, T] -> [B] fp32.

    The logits at position t predict token t + 1; log-softmax in fp32 (bf16 sums over hundreds of tokens lose
    digits); the labels keep the response tokens only."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]                                                     # [B, T-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (targets != IGNORE)).sum(-1)


# ---- The speed path. Two changes to how log pi(y|x) is computed, none to the number (up to fp32 rounding):
#   1. The definition builds [B, T, V] fp32 logits and a log-softmax of that size (and in training their
#      gradients): with V ~ 50k that is most of the memory, and prompt positions (~70% of HH-RLHF's tokens)
#      pay for a projection nobody reads. Below, the model's body runs as usual and only the hidden states that
#      predict a response token reach the output head, a chunk of rows at a time, recomputed in backward
#      (token_logps, response_logps). tests/test_kernel.py: test_lean_kernel_equals_full_softmax.
#   2. A pair's two responses continue the same prompt: pack_pairs lays prompt + chosen + rejected out in one
#      row, the prompt run once, and short pairs share a row (pair_logps).
#      tests/test_kernel.py: test_shared_prompt_equals_unshared.

LOGPS_CHUNK = 2 ** 23  # elements of the largest logits block, [chunk rows, V] (32 MB in fp32)

# Families whose causal-LM forward is  logits = post(lm_head(base_model(...).last_hidden_state)), post one of:
# None, ("softcap", config key) -> c * tanh(z / c), ("mul", key) -> z * s, ("div", key) -> z / s. Read off the
# transformers source; any other model_type takes the plain path (lib/models.py says so before a run).
HEAD_POST = {t: None for t in ("opt", "gpt2", "gpt_neox", "gpt_neo", "gptj", "llama", "mistral", "mixtral",
                                 "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "smollm3", "starcoder2")}
HEAD_POST.update({"gemma2": ("softcap", "final_logit_softcapping"),
                  "gemma3_text": ("softcap", "final_logit_softcapping"),
                  "cohere": ("mul", "logit_scale"), "granite": ("div", "logits_scaling")})


def head_of(model) -> dict | None:
    """What the kernel needs from a model's output head: {"weight": [V, H], "bias": [V] or None, "scale",
    "softcap"}; None for a family outside HEAD_POST (the plain path)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if kind not in HEAD_POST or not isinstance(head, nn.Linear):
        return None
    post, scale, softcap = HEAD_POST[kind], 1.0, None
    if post is not None:
        value = getattr(cfg, post[1], None)
        if post[0] == "softcap":
            softcap = value
        elif value is not None:
            scale = float(value) if post[0] == "mul" else 1.0 / float(value)
    return {"weight": head.weight, "bias": head.bias, "scale": scale, "softcap": softcap}


def _chunk_logits(h: torch.Tensor, weight, bias, scale: float, softcap, dtype=None) -> torch.Tensor:
    """[n, H] -> fp32 logits z = post(scale * (h W^T + b)), [n, V], the product computed in the autocast dtype, or in
    fp32 when dtype is torch.float32 (then no logit is rounded to bf16 first)."""
    if dtype == torch.float32:
        with torch.autocast(h.device.type, enabled=False):
            u = F.linear(h.float(), weight.float(), None if bias is None else bias.float())
    else:
        u = F.linear(h, weight, bias).float()
    if scale != 1.0:
        u = u * scale
    return softcap * torch.tanh(u / softcap) if softcap else u


class _TokenLogps(torch.autograd.Function):
    """log softmax(z)[target] per row, z = _chunk_logits, `rows` rows of logits at a time. Only the inputs are
    saved: backward recomputes each chunk's logits, under the autocast state the forward ran in."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, scale, softcap, rows, dtype):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):
            z = _chunk_logits(h[s:s + rows], weight, bias, scale, softcap, dtype)
            out[s:s + rows] = z.gather(1, targets[s:s + rows, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.scale, ctx.softcap, ctx.rows, ctx.dtype = scale, softcap, rows, dtype
        dev = h.device.type  # autocast is off when autograd runs a backward: record it here, re-enter it there
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            for s in range(0, h.shape[0], ctx.rows):
                hs, g = h[s:s + ctx.rows], grad_out[s:s + ctx.rows].float()
                z = _chunk_logits(hs, weight, bias, ctx.scale, ctx.softcap, ctx.dtype)
                # d out / d z = onehot(target) - softmax(z), times the incoming gradient
                dz = torch.softmax(z, dim=-1).mul_(-g[:, None])
                dz.scatter_add_(1, targets[s:s + ctx.rows, None], g[:, None])  # one target a row: no collisions
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
                None, None, None, None, None)


def token_logps(hidden: torch.Tensor, head: dict, targets: torch.Tensor, chunk: int | None = None,
                head_dtype: torch.dtype | None = None) -> torch.Tensor:
    """log p(target | hidden) at N selected positions: hidden [N, H] (each the state that predicts its target),
    targets [N] -> [N] fp32, p the model's own output distribution (head_of). A full log_softmax's numbers up to
    fp32 rounding (logit - logsumexp, not the same float operations: a few ulps apart), computed [chunk / V rows,
    V] at a time, forward and backward (_TokenLogps): no [N, V] tensor exists. head_dtype torch.float32: the head's
    product in fp32 under bf16 autocast too (bf16 logits round a response's log-prob by about 0.1 nat)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    rows = max(1, (chunk or LOGPS_CHUNK) // head["weight"].shape[0])
    return _TokenLogps.apply(hidden, head["weight"], head["bias"], targets, head["scale"], head["softcap"], rows,
                             head_dtype)


def row_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [N] laid out row by row where mask [S, L] is True, summed per row -> [S] fp32. A dense sum in a fixed
    order: the same bits on every run (an index_add over repeated indices is not, on CUDA)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values).sum(-1)


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, head_dtype: torch.dtype | None = None) -> torch.Tensor:
    """log pi(y|x): response_logps_plain's number without its [B, T, V] logits. [B, T] x 3 -> [B] fp32.
    Families outside HEAD_POST take the plain path. head_dtype: token_logps's."""
    head = head_of(model)
    if head is None:
        return response_logps_plain(model, input_ids, attention_mask, labels)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]                                         # [B, T-1]: position t predicts token t + 1
    response = targets != IGNORE                                    # [B, T-1]
    lp = token_logps(hidden[:, :-1][response], head, targets[response], head_dtype=head_dtype)   # [N], row by row
    return row_sums(lp, response)


# A pair packed into one row: prompt + chosen + rejected, each response seeing the prompt and itself, the rejected
# one never the chosen one, its positions restarting where the prompt ends. Short pairs share a row (pack_rows),
# each seeing only itself. One row holding pair a (prompt p1 p2, chosen c1 c2, rejected r1 r2) and pair b:
#
#     token       p1 p2 c1 c2 r1 r2 | q1 d1 s1 | pad
#     position     0  1  2  3  2  3 |  0  1  1 |  0
#     r2 sees      x  x  .  .  x  x |  .  .  . |  .      (x: visible)
#     predicts    p2 c1 c2  -  r2 - | d1  -  - |
#       (r1 is predicted by the last prompt state, p2's; s1 by q1's)
#
# That is the forward of both sequences (p c, p r) with the prompt computed once, and of each pair alone. SFT packs
# prompt + chosen the same way (one response a pair): rows without padding between short sequences.

PACK_FAMILIES = {"opt", "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma"}  # take position_ids
PROMPT = 0  # the part of a segment each token is: the prompt, then response 1, 2, ...; -1 marks padding
# Above this many tokens in a batch's longest pair, pairs run as whole sequences: a packed row's [T, T] mask and
# the dense attention it needs grow as T^2 (docs/training.md: where packing stops paying)
PACK_MAX_LEN = 2048


def can_pack(model) -> bool:
    """Whether pair_logps can pack pairs for this model: a family that takes explicit positions, whose head the
    kernel knows, under an attention that applies a given [R, 1, T, T] mask (SDPA, transformers' default, or
    eager; flash attention takes no mask)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) in PACK_FAMILIES and head_of(model) is not None
            and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager"))


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


def pack_pairs(pairs: list[dict], pad: int, device, responses=RESPONSES) -> tuple[dict, list[tuple]]:
    """B tokenized pairs -> (the model's inputs: input_ids and position_ids [R, T], attention_mask [R, 1, T, T]
    bool; and for each of `responses` (the pairs' fields to score, in order): the states that predict its tokens,
    as an index into the flattened [R * T] states, [N]; those tokens, [N]; which of them are whose, [B, L] bool)."""
    lengths = [len(e["prompt_ids"]) + sum(len(e[k]) for k in responses) for e in pairs]
    layout = pack_rows(lengths)
    R, T = len(layout), max(lengths)
    ids = torch.full((R, T), pad, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    owner = torch.full((R, T), -1, dtype=torch.long)  # the pair each token belongs to
    part = torch.full((R, T), -1, dtype=torch.long)   # PROMPT, or which response (1, 2, ...)
    pred = [[] for _ in pairs]                          # per pair and response: the states that predict its tokens
    for row, members in enumerate(layout):
        o = 0  # where the next segment starts in the row
        for i in members:
            e = pairs[i]
            p, at = len(e["prompt_ids"]), o + len(e["prompt_ids"])
            ids[row, o:at] = torch.tensor(e["prompt_ids"])
            pos[row, o:at] = torch.arange(p)
            part[row, o:at], owner[row, o:at] = PROMPT, i
            for k, key in enumerate(responses, start=1):  # each response continues the prompt: positions p, p+1, ..
                n = len(e[key])
                ids[row, at:at + n] = torch.tensor(e[key])
                pos[row, at:at + n] = torch.arange(p, p + n)
                part[row, at:at + n], owner[row, at:at + n] = k, i
                # the state before a token predicts it; a response's first token: the prompt's last state
                pred[i].append(row * T + torch.cat([torch.tensor([o + p - 1]), torch.arange(at, at + n - 1)]))
                at += n
            o = at
    # the mask, built where the model runs: a token sees the earlier tokens of its own pair, except those of its
    # pair's other responses; a padding position sees itself (else its softmax is 0/0)
    owner, part = owner.to(device), part.to(device)
    col = torch.arange(T, device=device)
    q, k = part[:, :, None], part[:, None, :]
    sees = ((owner[:, :, None] == owner[:, None, :]) & (col[:, None] >= col[None, :])
            & ~((q > PROMPT) & (k > PROMPT) & (q != k)))
    sees |= (owner < 0)[:, :, None] & torch.eye(T, dtype=torch.bool, device=device)
    inputs = {"input_ids": ids.to(device), "position_ids": pos.to(device), "attention_mask": sees[:, None]}
    out = []
    for k, key in enumerate(responses):
        states = torch.cat([pred[i][k] for i in range(len(pairs))])
        targets = torch.tensor([t for e in pairs for t in e[key]], dtype=torch.long)
        n = torch.tensor([len(e[key]) for e in pairs])
        out.append((states.to(device), targets.to(device), (torch.arange(int(n.max()))[None, :] < n[:, None]).to(device)))
    return inputs, out


def pair_logps(model, pairs: list[dict], pad: int, pack: bool | None = None, head_dtype: torch.dtype | None = None,
               responses=RESPONSES) -> torch.Tensor:
    """[B, 2]: log pi(chosen | x), log pi(rejected | x) of B tokenized pairs (prompt_ids, chosen_ids,
    rejected_ids); [B, 1] with responses=("chosen_ids",) (SFT's sequences). pack (default: can_pack) lays each
    pair out in one row, its prompt run once for all its responses, short pairs sharing a row (pack_pairs); else
    every prompt + response runs as a whole sequence (response_logps on collate_pairs), as SFT's sequences do when
    no two share a row. The same numbers either way, up to fp32 rounding, with or without gradients. head_dtype:
    token_logps's."""
    if pack is None:
        pack = can_pack(model)
    elif pack and not can_pack(model):
        raise ValueError(f"pair_logps: packing is not supported for this model "
                         f"({getattr(model.config, 'model_type', None)!r}, {model.config._attn_implementation!r})")
    cfg = model.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    lengths = [len(e["prompt_ids"]) + sum(len(e[k]) for k in responses) for e in pairs]
    longest = max(lengths)
    # one response a pair (SFT) and no two sharing a row: the rows would be the padded batch, so run it as one
    alone = len(responses) == 1 and len(pack_rows(lengths)) == len(pairs)
    if not pack or alone or longest > PACK_MAX_LEN or (window and longest > window):  # a mask would lift a window
        dev = next(model.parameters()).device
        batch = {k: v.to(dev) for k, v in collate_pairs(pairs, pad, responses).items()}
        return torch.stack(response_logps(model, **batch, head_dtype=head_dtype).chunk(len(responses)), dim=-1)
    head = head_of(model)
    inputs, scored = pack_pairs(pairs, pad, head["weight"].device, responses)
    if cfg._attn_implementation == "eager":  # eager attention adds its mask to the scores
        inputs["attention_mask"] = torch.zeros(inputs["attention_mask"].shape, device=head["weight"].device).masked_fill_(
            ~inputs["attention_mask"], torch.finfo(torch.float32).min)
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)  # [R * T, H]
    # one response at a time: a gather each, so that no state is taken twice in one (the prompt's last state
    # predicts every response's first token; CUDA would sum a repeated index's gradients with atomic adds)
    return torch.stack([row_sums(token_logps(hidden[states], head, targets, head_dtype=head_dtype), mask)
                        for states, targets, mask in scored], dim=-1)                    # [B, len(responses)]


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
# Eq. 4  The weak teacher pi_w: DPO (Eq. 3) of the small model on the human-labeled D_l, from pi_ref = its SFT
#        model. train_dpo.py --teacher; nothing new to compute, only other data than Eq. 6 reads.


# ----------------------------------------------------------------------------------------------------------
# Eq. 5  The weak teacher's reward of a response,  r(x, y) = beta log(pi_w(y|x) / pi_ref(y|x)),  and its label:
#        of the two responses y1, y2 of an unlabeled pair, the one with the higher reward is "chosen". label.py
#        is these functions applied to pair_logps under pi_w and under pi_ref.


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)). [B], [B] -> [B]. (The partition term beta log Z(x) of
    the KL-regularised optimum is the same for both responses of a prompt, so it cancels in every comparison
    and is left out.)"""
    return beta * (policy_logps - ref_logps)


def prefers_first(reward_1: torch.Tensor, reward_2: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """The weak label: [B] bool, True where the teacher's chosen response is y1 (the higher reward). Inputs: the
    rewards of y1 and y2, [B] each; tie_break [B] bool, the answer on an exact tie (text_tie_break). When y1 is
    the response the humans chose, breaking ties by that order would let a teacher that cannot tell two
    responses apart (pi_w == pi_ref, say) copy the human labels."""
    return torch.where(reward_1 == reward_2, tie_break, reward_1 > reward_2)


def text_tie_break(y1: str, y2: str) -> bool:
    """The answer to an exact tie (True: y1 wins). A fixed hash of the unordered pair of texts picks the winning
    text, so the label does not depend on the order the pair came in: swapping y1 and y2 names the same winner."""
    first, second = sorted((y1, y2))
    first_wins = hashlib.sha256((first + "\0" + second).encode()).digest()[0] < 128
    return first_wins == (y1 == first)


# ----------------------------------------------------------------------------------------------------------
# Eq. 6  The student pi_weak: DPO (Eq. 3) of the bigger model on D_u labeled by the weak teacher, from its own SFT
#        model. train_dpo.py --student --labels weak; the control pi_human is the same run on D_u's human labels
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
    settings are recorded as model.wlt_lora, for saving and merging. A is random: seed before calling it.
    ValueError for a family without default targets, or targets that match no linear layer."""
    from transformers.pytorch_utils import Conv1D
    if targets is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in LORA_TARGETS:
            raise ValueError(f"no default LoRA targets for model type {mt!r} (known: {', '.join(sorted(LORA_TARGETS))})")
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
        raise ValueError(f"LoRA targets {targets} match no linear layer of this model")
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
