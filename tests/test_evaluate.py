"""evaluate.py: the cached, left-padded sampler against a naive one, per-prompt seeding, the statistics
against hand-computed values, and the script end to end with the synthetic world's exact gold reward and
with tiny randomly initialised reward models of both input formats (chat template; text pair)."""
import json
import math
import os
import shutil

import pytest
import torch

from conftest import FAMILIES, ROOT, make_rm, run_script

import evaluate as ev
from lib import data, synthetic

EVAL = os.path.join(ROOT, "evaluate.py")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------------------------------------
# sampling


def naive_greedy(model, prompt: list[int], eos: int, n: int) -> list[int]:
    """Greedy decoding of one unpadded prompt, recomputing the whole sequence at every step (no cache)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            if t == eos:
                break
            ids.append(t)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_left_padded_generation_equals_naive(family, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tiny_model_dir(family)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = ["Human: How do I bake bread at home? Assistant:", "sort: 7 3 9 1 =>", "The quick brown fox jumps over",
             "TL;DR:"]
    prompts = [tok(t).input_ids for t in texts]  # different lengths: left padding is exercised
    got = ev.generate(model, prompts, [0] * 4, tok.eos_token_id, data.pad_id(tok), 0.0, 12, torch.device("cpu"), "fp32")
    for p, g in zip(prompts, got):
        assert g == naive_greedy(model, p, tok.eos_token_id, 12)


def test_sampling_is_seeded_per_prompt_not_per_batch(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tok(t).input_ids for t in ["Human: hi Assistant:", "sort: 7 3 =>", "The quick brown", "TL;DR: keep"]]
    args = (tok.eos_token_id, data.pad_id(tok), 1.0, 10, torch.device("cpu"), "fp32")
    together = ev.generate(model, prompts, [5, 6, 7, 8], *args)
    alone = [ev.generate(model, [p], [s], *args)[0] for p, s in zip(prompts, [5, 6, 7, 8])]
    assert together == alone
    reordered = ev.generate(model, prompts[::-1], [8, 7, 6, 5], *args)
    assert reordered[::-1] == together
    other_seed = ev.generate(model, prompts, [15, 16, 17, 18], *args)
    assert other_seed != together  # T=1 on a random model: different seeds give different samples


def test_hh_messages():
    p = "\n\nHuman: Sort 7 3\n\nAssistant: 3 7\n\nHuman: and 5 2?\n\nAssistant:"
    assert ev.hh_messages(p) == [{"role": "user", "content": "Sort 7 3"}, {"role": "assistant", "content": "3 7"},
                                 {"role": "user", "content": "and 5 2?"}]
    assert ev.hh_messages("A reddit post.\n") == [{"role": "user", "content": "A reddit post."}]
    # roles must alternate for chat templates: an empty turn and a preamble do not break that
    p = "Context.\n\nHuman: a\n\nAssistant:\n\nHuman: b\n\nAssistant:"
    assert ev.hh_messages(p) == [{"role": "user", "content": "Context.\n\na\n\nb"}]


# ---------------------------------------------------------------------------------------------------------
# statistics, against values computed by hand


def test_mean_se_and_paired_delta():
    m, se = ev.mean_se([1.0, 2.0, 3.0, 6.0])  # mean 3, sample variance (4+1+0+9)/3 = 14/3
    assert m == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)
    d, dse = ev.paired_delta([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])  # differences 1, 2, 3: mean 2, sd 1
    assert d == 2.0 and dse == pytest.approx(1 / math.sqrt(3))


def test_win_rate_counts_ties_apart():
    w = ev.win_rate([1, 2, 3, 4, 5], [0, 2, 4, 4, 1])  # win, tie, loss, tie, win
    assert (w["win"], w["tie"], w["loss"], w["n"]) == (0.4, 0.4, 0.2, 5)
    assert w["win_excluding_ties"] == pytest.approx(2 / 3)


def test_label_quality_by_hand():
    rows = [{"human_agrees": True}, {"human_agrees": True}, {"human_agrees": False}, {"human_agrees": False},
            {"human_agrees": False}]
    # (gold of the row's chosen, of its rejected); rows are in teacher order
    gold = [(1.0, 0.0), (0.5, 0.7), (0.9, 0.2), (0.1, 0.3), (0.4, 0.4)]
    q = ev.label_quality(rows, gold)
    assert q["match"]["pairs"] == 2 and q["match"]["share"] == 0.4
    assert q["match"]["gold_chosen"] == pytest.approx(0.75) and q["match"]["gold_rejected"] == pytest.approx(0.35)
    # mismatch rows by the human label (the teacher's rejected is the human's chosen): chosen 0.2, 0.3, 0.4
    assert q["mismatch"]["gold_chosen"] == pytest.approx(0.3) and q["mismatch"]["gold_rejected"] == pytest.approx(1.4 / 3)
    assert q["mismatch"]["gap"] == pytest.approx(0.3 - 1.4 / 3)
    assert q["mismatch"]["teacher_right"] == pytest.approx(1 / 3) and q["mismatch"]["gold_ties"] == pytest.approx(1 / 3)
    # human right on rows 1 and 4; weak right on rows 1 and 3
    assert q["gold_accuracy"]["human"] == pytest.approx(0.4) and q["gold_accuracy"]["weak"] == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------------------
# end to end


def test_synthetic_run_end_to_end(synthetic_run, tmp_path):
    """Exact gold reward, the four roles, label quality from a weak.jsonl whose answers are known, rerun."""
    run = str(tmp_path / "run")
    shutil.copytree(synthetic_run, run)
    unl = read_jsonl(os.path.join(run, "data", "unlabeled.jsonl"))
    # a "teacher" that flips every third pair: its label quality is known from prepare's gold fields
    weak = []
    for i, r in enumerate(unl):
        agree = i % 3 != 0
        weak.append({"prompt": r["prompt"], "chosen": r["chosen"] if agree else r["rejected"],
                     "rejected": r["rejected"] if agree else r["chosen"], "chosen_reward": 1.0, "rejected_reward": 0.0,
                     "human_agrees": agree})
    write_jsonl(os.path.join(run, "data", "weak.jsonl"), weak)
    write_jsonl(os.path.join(run, "data", "weak.summary.json"), [{}])  # label.py's completion marker
    m = os.path.join(run, "models")
    out = str(tmp_path / "eval")
    cmd = [EVAL, "--run-dir", run, "--out", out, "--num-prompts", "24", "--max-new-tokens", "6", "--batch-size", "5",
           "--policy", f"base={m}/student-base", "--policy", f"sft={m}/teacher-base",
           "--policy", f"human={m}/student-base", "--policy", f"weak={m}/teacher-base"]
    run_script(*cmd)
    res = json.load(open(os.path.join(out, "results.json")))
    gens = read_jsonl(os.path.join(out, "generations.jsonl"))
    assert len(gens) == 4 * 24
    test = read_jsonl(os.path.join(run, "data", "test.jsonl"))
    for g in gens:
        assert g["prompt"] == test[g["index"]]["prompt"]
        assert g["gold"] == synthetic.gold_reward(g["prompt"], g["response"])
    # same model, same per-prompt seeds -> same samples
    by = {(g["policy"], g["index"]): g["response"] for g in gens}
    assert all(by[("base", i)] == by[("human", i)] and by[("sft", i)] == by[("weak", i)] for i in range(24))
    pol = res["policies"]
    assert len(res["host_peak_mib_per_rank"]) == len(res["host_before_load_mib_per_rank"]) == 1
    assert res["host_peak_mib_per_rank"][0] >= res["host_before_load_mib_per_rank"][0] > 0
    assert pol["sft"]["vs_base"] == pytest.approx(pol["sft"]["mean"] - pol["base"]["mean"])
    assert pol["weak"]["vs_sft"]["delta"] == 0 and "vs_sft" not in pol["sft"]
    assert res["win_rate"]["n"] == 24 and res["win_rate"]["tie"] + res["win_rate"]["win"] + res["win_rate"]["loss"] == pytest.approx(1)
    lq = res["label_quality"]
    assert lq["agreement"] == pytest.approx(sum(w["human_agrees"] for w in weak) / len(weak))
    # gold accuracies from prepare's own gold fields (independent of evaluate's gold_reward calls)
    human_right = sum(r["gold_chosen"] > r["gold_rejected"] for r in unl) / len(unl)
    weak_right = sum((r["gold_chosen"] > r["gold_rejected"]) == (i % 3 != 0) for i, r in enumerate(unl)) / len(unl)
    assert lq["gold_accuracy"]["human"] == pytest.approx(human_right)
    assert lq["gold_accuracy"]["weak"] == pytest.approx(weak_right)
    md = open(os.path.join(out, "results.md")).read()
    assert "pi_weak (DPO, weak labels)" in md and "Win rate" in md and "Gold accuracy" in md
    assert f"{100 * human_right:.1f}%" in md
    # a rerun with the same command does nothing and prints the same table
    before = os.stat(os.path.join(out, "results.json")).st_mtime_ns
    p2 = run_script(*cmd)
    assert "nothing to do" in p2.stdout and md.strip() in p2.stdout
    assert os.stat(os.path.join(out, "results.json")).st_mtime_ns == before


HH_TEST = [
    {"prompt": "\n\nHuman: How do I bake bread at home?\n\nAssistant:", "chosen": " Mix.", "rejected": " No."},
    {"prompt": "\n\nHuman: Sort 7 3\n\nAssistant: 3 7\n\nHuman: and 5 2?\n\nAssistant:", "chosen": " 2 5", "rejected": " 5 2"},
    {"prompt": "\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant:", "chosen": " Jokes?", "rejected": " Fox."},
]


def independent_rm_score(path: str, kind: str, prompt: str, response: str) -> float:
    """One unpadded forward of the reward model on the input the format prescribes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    if hasattr(model, "score"):  # decoder RM, one unpadded sequence: transformers then reads the last token
        model.config.pad_token_id = None
    if kind.startswith("chat"):
        msgs = ev.hh_messages(prompt) + [{"role": "assistant", "content": response.strip()}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False, return_tensors="pt")
    else:
        ids = tok(prompt.strip(), response.strip(), return_tensors="pt")
        assert ids["token_type_ids"].max() == 1  # the answer's segment is marked
    with torch.no_grad():
        return float(model(**ids).logits[0, 0])


@pytest.mark.parametrize("kind", ["chat", "chat-pad-eos", "pair"])
def test_gold_reward_model_end_to_end(kind, tiny_model_dir, tmp_path):
    rm = make_rm(kind, str(tmp_path / f"rm-{kind}"))
    run = str(tmp_path / "run")
    write_jsonl(os.path.join(run, "data", "test.jsonl"), HH_TEST)
    weak = [dict(r, chosen_reward=0.5, rejected_reward=0.1, human_agrees=i != 1) for i, r in enumerate(HH_TEST * 2)]
    write_jsonl(os.path.join(run, "data", "weak.jsonl"), weak)
    write_jsonl(os.path.join(run, "data", "weak.summary.json"), [{}])
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"source": "hh-rlhf", "student_model": tiny_model_dir("opt")}, f)
    out = str(tmp_path / "eval")
    run_script(EVAL, "--run-dir", run, "--out", out, "--gold-rm", rm, "--max-new-tokens", "5", "--rm-batch-size", "2",
               "--analysis-pairs", "4", "--policy", f"base={tiny_model_dir('opt')}", "--policy", f"sft={tiny_model_dir('gpt2')}")
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["setup"]["gold"] == f"{rm} ({kind[:4]} format)"
    gens = read_jsonl(os.path.join(out, "generations.jsonl"))
    assert len(gens) == 2 * len(HH_TEST)
    for g in gens:  # batched, padded, sorted scoring == one unpadded forward per sample
        assert g["gold"] == pytest.approx(independent_rm_score(rm, kind, g["prompt"], g["response"]), abs=1e-4)
    lq = res["label_quality"]
    assert lq["pairs"] == 4 and lq["agreement_pairs"] == 6 and "sample of 4 of 6" in lq["sample"]
    assert lq["agreement"] == pytest.approx(5 / 6)  # every row but the second


def test_errors(synthetic_run, tmp_path, tiny_model_dir):
    p = run_script(EVAL, "--policy", "a=x", check=False)
    assert p.returncode == 2 and "--prompts" in p.stderr
    p = run_script(EVAL, "--policy", "nonsense", "--prompts", "p", "--out", "o", check=False)
    assert p.returncode == 2 and "NAME=PATH" in p.stderr
    bad = str(tmp_path / "bad.jsonl")
    write_jsonl(bad, [{"prompt": "fine"}, {"text": "no prompt"}])
    p = run_script(EVAL, "--policy", f"a={tiny_model_dir('opt')}", "--prompts", bad, "--out", str(tmp_path / "o"),
                   "--gold-rm", str(tmp_path / "nope"), check=False)
    assert p.returncode == 1 and f"{bad}:2" in p.stderr and "Traceback" not in p.stderr
    p = run_script(EVAL, "--policy", f"a={tiny_model_dir('opt')}", "--prompts", bad, "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 1 and "--gold-rm is required" in p.stderr


def test_z_score_edge_cases():
    assert ev.z_score(0.2, 0.1) == pytest.approx(2.0)
    assert ev.z_score(-0.2, 0.0) == -math.inf and ev.z_score(0.2, 0.0) == math.inf
    assert math.isnan(ev.z_score(0.0, 0.0)) and math.isnan(ev.z_score(0.3, float("nan")))
