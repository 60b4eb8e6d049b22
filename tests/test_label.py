"""label.py end to end: the weak teacher's Eq. 5 rewards against an independent computation (one sequence at a
time, full softmax in float64), adapter on/off == two models, output order and fields, the summary, skips,
reruns, and 2 processes == 1 process."""
import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, HH_SAMPLE, run_script, torchrun

LABEL = os.path.join(ROOT, "label.py")
DPO = os.path.join(ROOT, "train_dpo.py")
BETA = 0.3

# HH-RLHF-shaped pairs (prompt = dialogue up to the last "Assistant:"), with a gold field that must follow
# its response when the teacher swaps a pair.
PAIRS = [
    {"prompt": "\n\nHuman: How do I bake bread at home?\n\nAssistant:",
     "chosen": " Mix flour, water, salt and yeast, then let it rise.", "rejected": " I don't know.",
     "gold_chosen": 1.0, "gold_rejected": 0.0},
    {"prompt": "\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant:",
     "chosen": " Are you looking for practical joke ideas?", "rejected": " The quick brown fox.",
     "gold_chosen": 0.5, "gold_rejected": 0.25},
    {"prompt": "\n\nHuman: Sort 7 3 9 1\n\nAssistant: 1 3 7 9\n\nHuman: and 5 2?\n\nAssistant:",
     "chosen": " 2 5", "rejected": " 5 2, judge my vow. Human: ok? Assistant: yes", "gold_chosen": 1.0,
     "gold_rejected": 0.0},
    {"prompt": "Summaries should be short.\n", "chosen": "TL;DR: keep it brief", "rejected": "TL;DR: say what matters first",
     "gold_chosen": 0.3, "gold_rejected": 0.6},
] * 3


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, tmp_path_factory):
    """pi_ref = a tiny GPT-2 (Conv1D LoRA); pi_w = a few LoRA-DPO steps from it (merged + adapter/)."""
    d = tmp_path_factory.mktemp("label")
    data = str(d / "pairs.jsonl")
    write_jsonl(data, PAIRS)
    ref = tiny_model_dir("gpt2")
    dpo = str(d / "dpo")
    run_script(DPO, "--model", ref, "--data", data, "--out", dpo, "--max-steps", "4", "--batch-size", "4",
               "--lr", "5e-2", "--eval-pairs", "0", "--beta", "0.1")
    assert os.path.isfile(os.path.join(dpo, "adapter", "adapter_config.json"))
    merged = str(d / "merged")  # the same pi_w without its adapter: label.py then loads two models
    shutil.copytree(dpo, merged, ignore=shutil.ignore_patterns("adapter"))
    return {"dir": d, "data": data, "ref": ref, "dpo": dpo, "merged": merged}


def naive_logp(model, tok, prompt: str, response: str) -> float:
    """log pi(response | prompt) for one unpadded sequence: full softmax in float64, per the project's
    tokenization convention (joint ids cut at len(prompt ids), plus EOS)."""
    p = tok(prompt).input_ids
    joint = tok(prompt + response).input_ids
    assert joint[:len(p)] == p
    r = joint[len(p):] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([p + r])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return float(sum(lp[len(p) - 1 + k, t] for k, t in enumerate(r)))


def label(teacher, model, out, *extra, check=True):
    return run_script(LABEL, "--model", model, "--ref", teacher["ref"], "--data", teacher["data"], "--out", out,
                      "--beta", str(BETA), "--batch-size", "3", *extra, check=check)


@pytest.fixture(scope="module")
def labeled(teacher):
    out = str(teacher["dir"] / "weak.jsonl")
    p = label(teacher, teacher["dpo"], out)
    assert "adapter" in p.stdout
    return out


def test_rewards_match_an_independent_computation(teacher, labeled):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(teacher["ref"])
    pol = AutoModelForCausalLM.from_pretrained(teacher["merged"], dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(teacher["ref"], dtype=torch.float32).eval()
    rows = read_jsonl(labeled)
    assert len(rows) == len(PAIRS)
    swapped = 0
    for src, row in zip(PAIRS, rows):  # the input order is kept
        assert row["prompt"] == src["prompt"]
        assert {row["chosen"], row["rejected"]} == {src["chosen"], src["rejected"]}
        for k in ("chosen", "rejected"):
            want = BETA * (naive_logp(pol, tok, row["prompt"], row[k]) - naive_logp(ref, tok, row["prompt"], row[k]))
            assert row[f"{k}_reward"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert row["chosen_reward"] >= row["rejected_reward"]  # the teacher's order
        assert row["human_agrees"] == (row["chosen"] == src["chosen"])
        # extra fields follow their response
        assert row["gold_chosen"] == (src["gold_chosen"] if row["human_agrees"] else src["gold_rejected"])
        swapped += not row["human_agrees"]
    assert any(abs(r["chosen_reward"]) > 1e-3 for r in rows)  # the teacher moved away from its reference


def test_summary(teacher, labeled):
    rows = read_jsonl(labeled)
    s = json.load(open(labeled.replace(".jsonl", ".summary.json")))
    assert s["rows"] == s["labeled"] == len(PAIRS)
    assert s["agreement_with_input"] == pytest.approx(sum(r["human_agrees"] for r in rows) / len(rows))
    margins = [r["chosen_reward"] - r["rejected_reward"] for r in rows]
    assert s["reward_margin"]["mean"] == pytest.approx(sum(margins) / len(margins))
    assert s["reward_margin"]["min"] >= 0
    gold_right = sum(r["gold_chosen"] > r["gold_rejected"] for r in rows) / len(rows)
    assert s["gold_accuracy"]["weak"] == pytest.approx(gold_right)
    assert s["gold_accuracy"]["input"] == pytest.approx(sum(p["gold_chosen"] > p["gold_rejected"] for p in PAIRS) / len(PAIRS))
    assert s["pairs_per_s"] > 0 and s["args"]["beta"] == BETA


def test_adapter_on_off_equals_two_models(teacher, labeled):
    out = str(teacher["dir"] / "weak-two-models.jsonl")
    p = label(teacher, teacher["merged"], out)
    assert "two models" in p.stdout
    # one base serves as pi_w (adapter on) and pi_ref (adapter off): it holds one model plus the adapter, where
    # the merged teacher takes two models
    from safetensors.torch import load_file
    adapter = load_file(os.path.join(teacher["dpo"], "adapter", "adapter_model.safetensors"))
    lora_mib = sum(t.numel() * t.element_size() for t in adapter.values()) / 2 ** 20
    w_adapter = json.load(open(labeled.replace(".jsonl", ".summary.json")))["weights_mib_per_rank"][0]
    w_two = json.load(open(out.replace(".jsonl", ".summary.json")))["weights_mib_per_rank"][0]
    assert w_adapter == pytest.approx(w_two / 2 + lora_mib, rel=1e-3)
    for a, b in zip(read_jsonl(labeled), read_jsonl(out)):
        assert (a["chosen"], a["human_agrees"]) == (b["chosen"], b["human_agrees"])
        assert a["chosen_reward"] == pytest.approx(b["chosen_reward"], rel=1e-4, abs=1e-5)
        assert a["rejected_reward"] == pytest.approx(b["rejected_reward"], rel=1e-4, abs=1e-5)


def test_shared_prompt_equals_full_sequences(teacher, labeled):
    """--share-prompt off (each response with its own copy of the prompt) gives the rewards of the default,
    where each prompt runs once per model and its KV cache serves both responses."""
    out = str(teacher["dir"] / "weak-unshared.jsonl")
    label(teacher, teacher["dpo"], out, "--share-prompt", "off")
    for a, b in zip(read_jsonl(labeled), read_jsonl(out)):
        assert (a["chosen"], a["human_agrees"]) == (b["chosen"], b["human_agrees"])
        assert a["chosen_reward"] == pytest.approx(b["chosen_reward"], rel=1e-4, abs=1e-5)
        assert a["rejected_reward"] == pytest.approx(b["rejected_reward"], rel=1e-4, abs=1e-5)


def test_rerun_skips_and_changed_settings_relabel(teacher, labeled):
    before = os.stat(labeled).st_mtime_ns
    p = label(teacher, teacher["dpo"], labeled)
    assert "nothing to do" in p.stdout and os.stat(labeled).st_mtime_ns == before
    out = str(teacher["dir"] / "weak-beta.jsonl")
    shutil.copy(labeled, out)
    shutil.copy(labeled.replace(".jsonl", ".summary.json"), out.replace(".jsonl", ".summary.json"))
    p = run_script(LABEL, "--model", teacher["dpo"], "--ref", teacher["ref"], "--data", teacher["data"], "--out", out,
                   "--beta", str(2 * BETA), "--batch-size", "3")
    assert "nothing to do" not in p.stdout
    for a, b in zip(read_jsonl(labeled), read_jsonl(out)):  # beta scales the rewards, never the labels
        assert b["chosen"] == a["chosen"]
        assert b["chosen_reward"] == pytest.approx(2 * a["chosen_reward"], rel=1e-4, abs=1e-6)


def test_skips_are_counted_and_strict_fails(teacher):
    out = str(teacher["dir"] / "weak-short.jsonl")
    label(teacher, teacher["dpo"], out, "--max-len", "30")
    s = json.load(open(out.replace(".jsonl", ".summary.json")))
    n_skipped = sum(s["skipped"]["counts"].values())
    assert n_skipped == 6 and s["labeled"] + n_skipped == len(PAIRS) == s["rows"]
    assert len(read_jsonl(out)) == s["labeled"]
    assert any(":" in loc for locs in s["skipped"]["examples"].values() for loc in locs)  # file:line
    p = label(teacher, teacher["dpo"], str(teacher["dir"] / "strict.jsonl"), "--max-len", "30", "--strict", check=False)
    assert p.returncode == 1 and "does not fit --max-len 30" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(teacher["dir"] / "strict.jsonl")


def test_two_processes_equal_one(teacher, labeled):
    out = str(teacher["dir"] / "weak-2p.jsonl")
    torchrun(2, LABEL, "--model", teacher["dpo"], "--ref", teacher["ref"], "--data", teacher["data"], "--out", out,
             "--beta", str(BETA), "--batch-size", "3")
    one, two = read_jsonl(labeled), read_jsonl(out)
    assert [r["prompt"] for r in two] == [r["prompt"] for r in one]
    for a, b in zip(one, two):
        assert (a["chosen"], a["human_agrees"]) == (b["chosen"], b["human_agrees"])
        assert b["chosen_reward"] == pytest.approx(a["chosen_reward"], rel=1e-5, abs=1e-6)
    s = json.load(open(out.replace(".jsonl", ".summary.json")))
    assert s["processes"] == 2 and s["labeled"] == len(PAIRS)
    for k in ("host_peak_mib_per_rank", "host_before_load_mib_per_rank", "weights_mib_per_rank"):
        assert len(s[k]) == 2 and all(v > 0 for v in s[k]), k  # one value per rank


def test_real_hh_rows_if_present(tiny_model_dir, tmp_path):
    """Real HH-RLHF rows (the file WLT_HH_SAMPLE names, when set) through the source parser and label.py; the
    rewards checked against the independent computation on a few of them."""
    if not os.path.isfile(HH_SAMPLE):
        pytest.skip("set WLT_HH_SAMPLE to a file of HH-RLHF rows to run it")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with open(HH_SAMPLE) as f:
        raw = [json.loads(line) for _, line in zip(range(12), f)]
    src = str(tmp_path / "raw.jsonl")
    write_jsonl(src, raw)
    # two unrelated models with rotary positions (real rows are longer than the tiny models' 128 positions)
    ref, pol = tiny_model_dir("llama"), tiny_model_dir("gpt_neox")
    out = str(tmp_path / "weak.jsonl")
    # the fixtures share one tokenizer, so either model can be pi_w over the other
    run_script(LABEL, "--model", pol, "--ref", ref, "--data", src, "--out", out, "--beta", "0.1", "--max-len", "4096")
    rows = read_jsonl(out)
    assert len(rows) == len(raw)
    tok = AutoTokenizer.from_pretrained(ref)
    mp = AutoModelForCausalLM.from_pretrained(pol, dtype=torch.float32).eval()
    mr = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    for row in rows[:4]:
        for k in ("chosen", "rejected"):
            lw, lr = naive_logp(mp, tok, row["prompt"], row[k]), naive_logp(mr, tok, row["prompt"], row[k])
            # real responses are long (sums of ~-1000): fp32 rounding is relative to the sums, not to their
            # difference (the project's rule: 1e-5 * |sum| plus a small floor)
            assert row[f"{k}_reward"] == pytest.approx(0.1 * (lw - lr), abs=0.1 * 1e-5 * (abs(lw) + abs(lr)) + 1e-5)


def test_command_line_errors(teacher, tmp_path):
    p = run_script(LABEL, "--model", teacher["dpo"], "--data", teacher["data"], "--out", str(tmp_path / "x.jsonl"), check=False)
    assert p.returncode == 2 and "--ref is required" in p.stderr
    p = run_script(LABEL, "--model", teacher["dpo"], "--ref", str(tmp_path / "nope"), "--data", teacher["data"],
                   "--out", str(tmp_path / "x.jsonl"), check=False)
    assert p.returncode == 1 and "no such model folder" in p.stderr and "Traceback" not in p.stderr
    p = run_script(LABEL, "--teacher", "--run-dir", str(tmp_path), check=False)
    assert p.returncode == 1 and "config.json" in p.stderr


def test_ties_are_not_broken_by_the_human_order(teacher, tmp_path):
    """pi_w == pi_ref: every reward is exactly 0. The labels must then come from the fixed hash of the texts,
    not from the input order (which is the human label): a teacher that learnt nothing must not copy it. (pi_w is
    a copy of pi_ref: the same folder as both is refused.)"""
    import hashlib
    pairs = [{"prompt": f"\n\nHuman: question {i}\n\nAssistant:", "chosen": f" answer {i}", "rejected": f" other {i}"}
             for i in range(8)]
    data = str(tmp_path / "pairs.jsonl")
    write_jsonl(data, pairs)
    out = str(tmp_path / "weak.jsonl")
    same = shutil.copytree(teacher["ref"], str(tmp_path / "same"))
    p = run_script(LABEL, "--model", same, "--ref", teacher["ref"], "--data", data, "--out", out)
    assert "8 pair(s) with exactly equal rewards" in p.stdout
    rows = read_jsonl(out)
    want = [hashlib.sha256((q["chosen"] + "\0" + q["rejected"]).encode()).digest()[0] < 128 for q in pairs]
    assert [r["human_agrees"] for r in rows] == want
    assert 0 < sum(want) < len(want)  # both outcomes occur: the human order was not copied
    assert all(r["chosen_reward"] == r["rejected_reward"] == 0 for r in rows)
    # the tie-break is a function of the unordered pair: the humans' order swapped, the same text wins
    swapped = str(tmp_path / "swapped.jsonl")
    write_jsonl(swapped, [dict(q, chosen=q["rejected"], rejected=q["chosen"]) for q in pairs])
    run_script(LABEL, "--model", same, "--ref", teacher["ref"], "--data", swapped, "--out", out)
    again = read_jsonl(out)
    assert [r["chosen"] for r in again] == [r["chosen"] for r in rows]
    assert [r["human_agrees"] for r in again] == [not w for w in want]


def test_adapter_only_folder(teacher, labeled, tmp_path):
    """PI_W may be just adapter/ on top of PI_REF (no merged weights beside it)."""
    only = tmp_path / "adapter-only"
    shutil.copytree(os.path.join(teacher["dpo"], "adapter"), only / "adapter")
    out = str(tmp_path / "weak.jsonl")
    label(teacher, str(only), out)
    for a, b in zip(read_jsonl(labeled), read_jsonl(out)):
        assert a == b


def test_run_mode_needs_a_finished_teacher(synthetic_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(synthetic_run, run, ignore=shutil.ignore_patterns("teacher", "student", "eval"))
    p = run_script(LABEL, "--teacher", "--run-dir", run, check=False)
    assert p.returncode == 1 and "no finished training" in p.stderr and "Traceback" not in p.stderr
