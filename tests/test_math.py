"""The math of wlt.py, Eq. 2 to Eq. 5: dpo_loss against hand-computed values, response_logps against a naive
float64 reference on every tiny model family, sft_loss against a naive token-mean NLL."""
import copy
import math

import pytest
import torch

import wlt
from lib import data
from lib.console import WltError
from conftest import FAMILIES

IGNORE = -100


# ----------------------------------------------------------------------------------------------------------
# dpo_loss

def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# One pair worked out by hand: policy chosen/rejected = -1 / -3, reference chosen/rejected = -2 / -2.5.
PC, PR, RC, RR = -1.0, -3.0, -2.0, -2.5
#   h = (PC - RC) - (PR - RR) = (1.0) - (-0.5) = 1.5
H = 1.5


def _log_sigmoid(z):
    return -math.log(1.0 + math.exp(-z))


def _call(beta, loss_type="sigmoid", label_smoothing=0.0, pc=PC, pr=PR, rc=RC, rr=RR):
    return wlt.dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta, loss_type=loss_type,
                        label_smoothing=label_smoothing)


def test_dpo_sigmoid_by_hand():
    beta = 0.1
    losses, cr, rr = _call(beta)
    # -log sigmoid(0.1 * 1.5) = log(1 + exp(-0.15))
    expected = math.log(1.0 + math.exp(-0.15))
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.620957, abs=1e-6)  # ln(1.860708), worked out on paper
    # rewards: beta * (policy - ref)
    assert cr.item() == pytest.approx(0.1 * (PC - RC), rel=1e-12)   # 0.1
    assert rr.item() == pytest.approx(0.1 * (PR - RR), rel=1e-12)   # -0.05
    assert cr.item() - rr.item() == pytest.approx(beta * H, rel=1e-12)


def test_dpo_conservative_label_smoothing_by_hand():
    beta, eps = 0.1, 0.2
    losses, _, _ = _call(beta, label_smoothing=eps)
    # -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    expected = 0.8 * math.log(1.0 + math.exp(-0.15)) + 0.2 * math.log(1.0 + math.exp(0.15))
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    # label smoothing must change the loss (it is not silently ignored)
    assert abs(losses.item() - math.log(1.0 + math.exp(-0.15))) > 1e-3


def test_dpo_ipo_by_hand():
    beta = 0.1
    losses, cr, rr = _call(beta, loss_type="ipo")
    # (h - 1 / (2 beta))^2 = (1.5 - 5)^2 = 12.25
    assert losses.item() == pytest.approx(12.25, rel=1e-12)
    assert cr.item() == pytest.approx(0.1, rel=1e-12) and rr.item() == pytest.approx(-0.05, rel=1e-12)


def test_dpo_ipo_mean_by_hand():
    """train_dpo.py --loss-type ipo-mean: IPO on per-token means of policy and reference (TRL's IPO)."""
    import types
    import train_dpo
    pol, ref = _t(PC, PR).reshape(1, 2), _t(RC, RR).reshape(1, 2)
    lengths = torch.tensor([[2, 5]])  # chosen 2 tokens, rejected 5
    args = types.SimpleNamespace(beta=0.1, loss_type="ipo-mean", label_smoothing=0.0)
    losses, cr, rr = train_dpo.preference_loss(pol, ref, lengths, args)
    # h = (-1/2 - -2/2) - (-3/5 - -2.5/5) = 0.5 - (-0.1) = 0.6;  (0.6 - 5)^2 = 19.36
    assert losses.item() == pytest.approx(19.36, rel=1e-12)
    assert cr.item() == pytest.approx(0.05, rel=1e-12) and rr.item() == pytest.approx(-0.01, rel=1e-12)
    args.loss_type = "ipo"  # the summed form: as test_dpo_ipo_by_hand
    assert train_dpo.preference_loss(pol, ref, lengths, args)[0].item() == pytest.approx(12.25, rel=1e-12)


def test_dpo_hinge_active_and_zero_region():
    # active: max(0, 1 - 0.1 * 1.5) = 0.85
    losses, _, _ = _call(0.1, loss_type="hinge")
    assert losses.item() == pytest.approx(0.85, rel=1e-12)
    # zero region: beta = 1 -> 1 - 1.5 < 0 -> 0
    losses, _, _ = _call(1.0, loss_type="hinge")
    assert losses.item() == 0.0
    # negative margin: h = -1.5 (chosen and rejected swapped), beta 0.1 -> 1 + 0.15
    losses, _, _ = _call(0.1, loss_type="hinge", pc=PR, pr=PC, rc=RR, rr=RC)
    assert losses.item() == pytest.approx(1.15, rel=1e-12)


def test_dpo_batch_matches_per_row_formulas():
    """Several pairs at once, incl. negative margins; each loss from an independent scalar formula."""
    pc = [-1.0, -10.0, -4.0, -7.5]
    pr = [-3.0, -9.0, -4.0, -2.0]
    rc = [-2.0, -11.0, -5.0, -7.0]
    rr = [-2.5, -8.0, -3.0, -6.0]
    beta, eps = 0.5, 0.1
    for lt in ("sigmoid", "ipo", "hinge"):
        ls = eps if lt == "sigmoid" else 0.0
        losses, cr, rj = wlt.dpo_loss(_t(*pc), _t(*pr), _t(*rc), _t(*rr), beta, loss_type=lt, label_smoothing=ls)
        assert losses.shape == (4,)
        for i in range(4):
            h = (pc[i] - rc[i]) - (pr[i] - rr[i])
            if lt == "sigmoid":
                exp = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
            elif lt == "ipo":
                exp = (h - 1.0 / (2 * beta)) ** 2
            else:
                exp = max(0.0, 1.0 - beta * h)
            assert losses[i].item() == pytest.approx(exp, rel=1e-12, abs=1e-15), (lt, i)
            assert cr[i].item() == pytest.approx(beta * (pc[i] - rc[i]), abs=1e-15)
            assert rj[i].item() == pytest.approx(beta * (pr[i] - rr[i]), abs=1e-15)


def test_dpo_rewards_are_detached():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)
    losses, cr, rr = wlt.dpo_loss(pc, pr, torch.tensor([-2.0, -2.0]), torch.tensor([-2.5, -2.5]), 0.1)
    assert losses.requires_grad
    assert not cr.requires_grad and not rr.requires_grad
    assert cr.grad_fn is None and rr.grad_fn is None


def test_dpo_step0_identity():
    """pi == pi_ref: sigmoid loss is exactly log 2 and all rewards are 0."""
    lp_c = torch.tensor([-12.3, -0.5, -250.0])
    lp_r = torch.tensor([-3.1, -40.0, -251.0])
    for beta in (0.1, 0.5):
        losses, cr, rr = wlt.dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta)
        assert torch.allclose(losses, torch.full_like(losses, math.log(2.0)), rtol=0, atol=1e-7)
        assert torch.equal(cr, torch.zeros_like(cr)) and torch.equal(rr, torch.zeros_like(rr))
    # label smoothing at h = 0 is still log 2
    losses, _, _ = wlt.dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), 0.1, label_smoothing=0.3)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2.0)), rtol=0, atol=1e-7)


def test_dpo_unknown_loss_type_raises():
    with pytest.raises((ValueError, WltError)):
        _call(0.1, loss_type="kto_pair_typo")


def test_dpo_sigmoid_gradient():
    """d/d policy_chosen of -log sigmoid(beta h) = -beta * sigmoid(-beta h); rejected gets the opposite sign."""
    beta = 0.1
    pc = _t(PC, -5.0).requires_grad_(True)
    pr = _t(PR, -4.0).requires_grad_(True)
    rc, rr = _t(RC, -4.5), _t(RR, -4.2)
    losses, _, _ = wlt.dpo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()
    for i in range(2):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        g = -beta * (1.0 / (1.0 + math.exp(beta * h)))  # -beta * sigmoid(-beta h)
        assert pc.grad[i].item() == pytest.approx(g, rel=1e-10)
        assert pr.grad[i].item() == pytest.approx(-g, rel=1e-10)


# ----------------------------------------------------------------------------------------------------------
# response_logps

PAIRS = [
    {"prompt": "Human: How do I bake bread at home? Assistant:",
     "chosen": " Mix flour, water, salt and yeast, then let it rise.", "rejected": " No."},
    {"prompt": "sort: 7 3 9 1 =>", "chosen": " 1 3 7 9", "rejected": " 9 7 3 1 and some more words at the end"},
    {"prompt": "Summaries should be short. TL;DR:", "chosen": " keep it brief", "rejected": " say what matters first."},
]


def _load(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(bpe_tokenizer):
    exs, _ = data.tokenize_pairs(bpe_tokenizer, PAIRS)
    b = wlt.collate_pairs(exs, data.pad_id(bpe_tokenizer))
    lengths = b["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 2, "the test batch must have right padding of different lengths"
    assert (b["attention_mask"][:, 0] == 1).all()  # right padding: real tokens first
    return b


def naive_logps(model, input_ids, attention_mask, labels):
    """Reference: each sequence alone (padding cut off), model in float64, explicit loop over positions:
    sum over t with labels[t] != -100 of  logits[t-1][y_t] - log(sum_v exp(logits[t-1][v]))."""
    m64 = copy.deepcopy(model).double()
    out = []
    with torch.no_grad():
        for i in range(input_ids.shape[0]):
            n = int(attention_mask[i].sum())
            ids = input_ids[i, :n].unsqueeze(0)
            logits = m64(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()  # [n, V]
            total = 0.0
            for t in range(1, input_ids.shape[1]):
                y = int(labels[i, t])
                if y == IGNORE:
                    continue
                assert t < n, "a label on a padding position"
                row = logits[t - 1]
                mx = row.max()
                lse = mx + torch.log(torch.exp(row - mx).sum())
                total += float(row[y] - lse)
            out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def _close(got, ref):
    got, ref = got.double(), ref.double()
    tol = 1e-5 * ref.abs() + 1e-4
    assert ((got - ref).abs() <= tol).all(), f"\n got {got.tolist()}\n ref {ref.tolist()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_response_logps_matches_naive_fp64(family, tiny_model_dir, batch):
    model = _load(tiny_model_dir(family))
    with torch.no_grad():
        got = wlt.response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert got.shape == (batch["input_ids"].shape[0],) and got.dtype == torch.float32
    ref = naive_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert (ref < 0).all()  # every sequence has response tokens
    _close(got, ref)

    # padding invariance: each sequence alone (no padding) == inside the padded batch
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        with torch.no_grad():
            alone = wlt.response_logps(model, batch["input_ids"][i:i + 1, :n], batch["attention_mask"][i:i + 1, :n],
                                       batch["labels"][i:i + 1, :n])
        _close(alone, got[i:i + 1])

    # no label anywhere -> exactly 0
    with torch.no_grad():
        zero = wlt.response_logps(model, batch["input_ids"], batch["attention_mask"],
                                  torch.full_like(batch["labels"], IGNORE))
    assert torch.equal(zero, torch.zeros_like(zero))


def test_response_logps_counts_only_labels(tiny_model_dir, batch):
    """Dropping one response label removes exactly that token's log-prob (prompt tokens never count)."""
    model = _load(tiny_model_dir("opt"))
    labels = batch["labels"].clone()
    i = 0
    t = int((labels[i] != IGNORE).nonzero()[-1])  # last response token (EOS) of sequence 0
    labels2 = labels.clone()
    labels2[i, t] = IGNORE
    with torch.no_grad():
        full = wlt.response_logps(model, batch["input_ids"], batch["attention_mask"], labels)
        part = wlt.response_logps(model, batch["input_ids"], batch["attention_mask"], labels2)
        logits = model(input_ids=batch["input_ids"][i:i + 1, :t + 1]).logits[0, t - 1].double()
    one = float(torch.log_softmax(logits, -1)[int(labels[i, t])])
    assert full[i].item() - part[i].item() == pytest.approx(one, abs=1e-4)
    assert torch.allclose(full[1:], part[1:], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# sft_loss

def test_sft_loss_is_token_mean_nll(tiny_model_dir, batch):
    model = _load(tiny_model_dir("llama"))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    # naive: per-token NLL in float64, mean over every response token of the batch
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).logits
    nll, count = 0.0, 0
    for i in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            y = int(labels[i, t])
            if y == IGNORE:
                continue
            nll -= float(torch.log_softmax(logits[i, t - 1], -1)[y])
            count += 1
    naive = nll / count
    n_tokens = int((labels != IGNORE).sum())
    assert n_tokens == count
    with torch.no_grad():
        logps = wlt.response_logps(model, ids, mask, labels)
    loss = wlt.sft_loss(logps, n_tokens)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(naive, rel=1e-5, abs=1e-6)
    # micro-batches divided by the global token count add up to the whole-batch loss
    k = 2
    split = wlt.sft_loss(logps[:k], n_tokens) + wlt.sft_loss(logps[k:], n_tokens)
    assert split.item() == pytest.approx(loss.item(), rel=1e-6)
    # tensor token count works too
    assert wlt.sft_loss(logps, torch.tensor(n_tokens)).item() == pytest.approx(naive, rel=1e-5, abs=1e-6)


def test_sft_loss_hand_values():
    logps = torch.tensor([-6.0, -2.0], dtype=torch.float64)
    # 8 nats over 4 tokens -> 2.0
    assert wlt.sft_loss(logps, 4).item() == pytest.approx(2.0, rel=1e-12)


def test_label_smoothing_is_only_for_the_sigmoid_loss():
    x = torch.zeros(2)
    for loss_type in ("ipo", "hinge"):
        with pytest.raises(ValueError):
            wlt.dpo_loss(x, x, x, x, 0.1, loss_type, label_smoothing=0.1)


def test_preference_probability_by_hand_and_at_extreme_margins():
    """Eq. 1: sigmoid of the reward margin. By hand: 1/(1+e^-1) = 0.7310585786; symmetric, P(m) + P(-m) = 1;
    margins far beyond exp's range give 0 and 1 rather than an OverflowError."""
    assert wlt.preference_probability(0.0) == 0.5
    assert wlt.preference_probability(1.0) == pytest.approx(0.7310585786300049, rel=1e-15)
    assert wlt.preference_probability(-1.0) == pytest.approx(0.2689414213699951, rel=1e-15)
    for m in (0.3, 5.0, 30.0):
        assert wlt.preference_probability(m) + wlt.preference_probability(-m) == pytest.approx(1.0, abs=1e-15)
    assert wlt.preference_probability(-800.0) == 0.0
    assert wlt.preference_probability(-710.0) == pytest.approx(math.exp(-710.0), rel=1e-12)
    assert wlt.preference_probability(800.0) == 1.0


def test_weak_reward_and_label_by_hand():
    """Eq. 5 on two pairs worked by hand, beta 0.5: r = beta (log pi_w - log pi_ref).
    pair 0: y1 -4 vs -5 -> r 0.5; y2 -6 vs -6.4 -> r 0.2: the teacher keeps y1.
    pair 1: y1 -3 vs -2 -> r -0.5; y2 -7 vs -8 -> r 0.5: the teacher picks y2.
    An exact tie takes the tie_break's answer, whatever it is."""
    logps_w = _t(-4.0, -6.0, -3.0, -7.0).view(2, 2)    # [pair, (y1, y2)]
    logps_ref = _t(-5.0, -6.4, -2.0, -8.0).view(2, 2)
    r = wlt.implicit_reward(logps_w, logps_ref, 0.5)
    assert r.flatten().tolist() == pytest.approx([0.5, 0.2, -0.5, 0.5], abs=1e-12)
    assert wlt.prefers_first(r[:, 0], r[:, 1], torch.tensor([False, True])).tolist() == [True, False]
    tied = _t(0.25, 0.25)
    assert wlt.prefers_first(tied, tied, torch.tensor([True, False])).tolist() == [True, False]


def test_text_tie_break_ignores_the_order():
    """The same text wins whichever of the two comes first, and the pair decides (not a coin per call)."""
    pairs = [("a", "b"), ("the cat", "a dog"), (" 1 3 7 9", " 9 7 3 1"), ("", " ")]
    for y1, y2 in pairs:
        assert wlt.text_tie_break(y1, y2) != wlt.text_tie_break(y2, y1)
        assert wlt.text_tie_break(y1, y2) == wlt.text_tie_break(y1, y2)
    assert len({wlt.text_tie_break(y1, y2) for y1, y2 in pairs}) == 2  # not a constant answer
