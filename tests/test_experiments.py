"""experiments.py end to end on a CI-sized synthetic world: every experiment of the paper's ablations in one
command (`all`), reusing the base pipeline, with the LLM judge as an extra supervisor served by a local
stand-in on 127.0.0.1. Checked: each table exists and its numbers follow from the data (subset sizes, the
noise rate, the complementary gold accuracies on the mismatch subset), each variant was trained with the
setting it claims (beta, start model, labeled fraction), and the judge's key is written nowhere."""
import json
import os

import pytest

from conftest import ROOT, run_script
from test_judge import KEY, StandIn

TINY = {"PREPARE_ARGS": "--num-pairs 300 --num-test 30", "SFT_ARGS": "--max-steps 3", "DPO_ARGS": "--max-steps 3",
        "LABEL_ARGS": "--batch-size 64", "EVAL_ARGS": "--num-prompts 20 --max-new-tokens 12 --batch-size 32"}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    d = tmp_path_factory.mktemp("experiments")
    server = StandIn("sorted")
    base, root = str(d / "base"), str(d / "exp")
    p = run_script(os.path.join(ROOT, "extras", "experiments.py"), "all", "--base", base, "--root", root, "--fractions", "0.5",
                   "--seeds", "22", "--betas", "0.5,1.0", "--teachers", "1x32", "--judge", server.url,
                   "--judge-model", "stand-in", env={**TINY, "WLT_JUDGE_API_KEY": KEY})
    server.close()
    return {"base": base, "root": root, "stdout": p.stdout, "server": server}


def results(done, name):
    with open(os.path.join(done["root"], name, "results.md")) as f:
        md = f.read()
    with open(os.path.join(done["root"], name, "results.json")) as f:
        return md, json.load(f)


def test_fractions(done):
    md, res = results(done, "fractions")
    assert "| labeled fraction | D_l pairs |" in md
    assert res["0.5"]["labeled"] == 150 and res["0.5"]["unlabeled"] == 150  # half of the 300 training pairs
    cfg = json.load(open(os.path.join(done["root"], "fractions", "fraction-0.5", "config.json")))
    assert cfg["labeled_fraction"] == 0.5


def test_subsets_and_noise(done):
    md, res = results(done, "subsets")
    weak = read_jsonl(os.path.join(done["base"], "data", "weak.jsonl"))
    n_match = sum(r["human_agrees"] for r in weak)
    assert res["pairs"] == {"match": n_match, "mismatch-weak": len(weak) - n_match,
                            "mismatch-human": len(weak) - n_match, "noise": len(weak)}
    assert res["flip_rate"] == pytest.approx((len(weak) - n_match) / len(weak))
    d = os.path.join(done["root"], "subsets", "data")
    mw, mh = read_jsonl(os.path.join(d, "mismatch-weak.jsonl")), read_jsonl(os.path.join(d, "mismatch-human.jsonl"))
    # on every mismatch pair exactly one of the two label sources is gold-right (the world has no gold ties)
    for a, b in zip(mw, mh):
        assert (a["chosen"], a["rejected"]) == (b["rejected"], b["chosen"])
        assert (a["gold_chosen"] > a["gold_rejected"]) != (b["gold_chosen"] > b["gold_rejected"])
    noise = read_jsonl(os.path.join(d, "noise.jsonl"))
    human = read_jsonl(os.path.join(done["base"], "data", "unlabeled.jsonl"))
    assert 0 < sum(a["chosen"] != b["chosen"] for a, b in zip(noise, human)) < len(human)
    for name in ("D_u match", "D_u mismatch", "flipped at random", "(SFT reference)"):
        assert name in md
    assert set(res["eval"]["policies"]) == {"sft", "match", "mismatch-weak", "mismatch-human", "noise", "all-weak", "all-human"}


def test_beta(done):
    md, res = results(done, "beta")
    assert "| beta | pi_weak | pi_human |" in md and "| 1.0 |" in md
    cfg = json.load(open(os.path.join(done["root"], "beta", "dpo-weak-beta1.0", "train_config.json")))
    assert cfg["args"]["beta"] == 1.0
    assert res["policies"]["weak-beta0.5"]["path"].endswith(os.path.join("student", "dpo-weak"))  # the pipeline's own


def test_seeds(done):
    md, res = results(done, "seeds")
    assert "| 22 |" in md and "| mean |" in md and "| std |" in md
    assert res["stats"]["pi_weak"]["mean"] == pytest.approx(res["runs"]["22"]["results"]["policies"]["weak"]["mean"])


def test_sft_ref(done):
    md, res = results(done, "sft-ref")
    assert "DPO without SFT" in md
    cfg = json.load(open(os.path.join(done["root"], "sft-ref", "dpo-weak", "train_config.json")))
    base_cfg = json.load(open(os.path.join(done["base"], "config.json")))
    assert cfg["args"]["model"] == base_cfg["student_model"]  # started (and anchored) at the base model


def test_teachers_and_judge(done):
    md, res = results(done, "teachers")
    assert "| 1x32 |" in md and "LLM judge (stand-in)" in md and "| human labels |" in md
    t = res["teachers"]
    assert t["1x32"]["parameters"] < 1e5 and 0 <= t["1x32"]["agreement"] <= 1
    s = json.load(open(os.path.join(done["root"], "teachers", "judge", "weak.summary.json")))
    assert s["labeled"] == len(read_jsonl(os.path.join(done["base"], "data", "unlabeled.jsonl")))
    assert s["teacher"].startswith("LLM judge") and t["judge"]["agreement"] == s["agreement_with_input"]
    server = done["server"]
    assert len(server.requests) == 2 * s["labeled"] and server.keys == {f"Bearer {KEY}"}
    for dirpath, _, files in os.walk(done["root"]):
        for f in files:
            if f.endswith((".json", ".jsonl", ".md")):
                assert KEY not in open(os.path.join(dirpath, f), errors="replace").read(), f
    assert KEY not in done["stdout"]
