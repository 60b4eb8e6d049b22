"""launch.sh end to end, offline: the hh and tldr presets on tiny local files in the hub layouts, with tiny
models and tiny reward models of each input format; a changed setting reruns that stage and the stages that
read its output, and nothing else (a rerun of a finished pipeline: tests/test_readme.py's quick start)."""
import json
import os
import subprocess
import sys


from conftest import ROOT, make_rm

FAST = {  # tiny steps everywhere: the point is the plumbing, not the learning
    "SFT_ARGS": "--batch-size 4 --max-steps 2 --eval-pairs 0",
    "DPO_ARGS": "--batch-size 4 --max-steps 2 --eval-pairs 0",
    "EVAL_ARGS": "--max-new-tokens 4 --num-prompts 3 --batch-size 2",
}


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def launch(preset: str, env: dict) -> str:
    e = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **FAST, **env)
    p = subprocess.run(["bash", os.path.join(ROOT, "launch.sh"), preset], cwd=ROOT, env=e, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def stage_logs(out: str) -> dict:
    """stage number -> the lines it printed."""
    logs, cur = {}, None
    for line in out.splitlines():
        if line.startswith("== ") and "/8" in line:
            cur = int(line[3])
            logs[cur] = []
        elif cur:
            logs[cur].append(line)
    return logs


def skipped(logs: dict) -> set:
    return {n for n, lines in logs.items() if any("nothing to do" in x for x in lines)}


def hh_rows(n: int, start: int) -> list[dict]:
    """Raw HH-RLHF rows (two full dialogues), some with two turns."""
    rows = []
    for i in range(start, start + n):
        pre = f"\n\nHuman: How do I bake bread number {i}?\n\nAssistant:"
        if i % 3 == 0:
            pre = f"\n\nHuman: hi {i}\n\nAssistant: Hello!\n\nHuman: sort {i} 3 1\n\nAssistant:"
        rows.append({"chosen": pre + f" Mix flour, water and yeast {i}.", "rejected": pre + " I don't know."})
    return rows


def test_hh_preset_runs_reruns_and_follows_changes(tmp_path, tiny_model_dir):
    data = tmp_path / "hh-rlhf"
    write_jsonl(str(data / "harmless-base" / "train.jsonl"), hh_rows(24, 0))
    write_jsonl(str(data / "harmless-base" / "test.jsonl"), hh_rows(4, 100))
    run = str(tmp_path / "run")
    env = {"RUN": run, "DATA": str(data), "TEACHER": tiny_model_dir("llama"), "STUDENT": tiny_model_dir("gpt_neox"),
           "GOLD_RM": make_rm("chat", str(tmp_path / "rm"))}
    out = launch("hh", env)
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["beta"] == 0.1 and cfg["labeled_fraction"] == 0.5  # the paper's HH-RLHF settings
    weak = [json.loads(x) for x in open(os.path.join(run, "data", "weak.jsonl"))]
    assert len(weak) == cfg["counts"]["unlabeled"]["kept"] == 12
    res = json.load(open(os.path.join(run, "eval", "results.json")))
    assert list(res["policies"]) == ["base", "sft", "human", "weak"]
    assert "chat format" in res["setup"]["gold"] and res["label_quality"]["agreement_pairs"] == 12
    table = open(os.path.join(run, "eval", "results.md")).read()
    assert table.strip() in out

    # rerun with only the labels' beta changed: data/weak.jsonl changes, so the weak student and the evaluation
    # rerun; every other stage finds its output finished (a rerun with nothing changed, all eight skipped and
    # the table printed again, is tests/test_readme.py's quick start)
    logs = stage_logs(launch("hh", dict(env, LABEL_ARGS="--beta 0.2")))
    assert skipped(logs) == {1, 2, 3, 5, 7}


def test_tldr_preset(tmp_path, tiny_model_dir):
    def rows(n, start):
        return [{"prompt": f"SUBREDDIT: r/test\nTITLE: post {i}\nPOST: I baked bread {i} times and it failed.",
                 "chosen": f"TL;DR: bread failed {i} times", "rejected": "TL;DR: fox"} for i in range(start, start + n)]
    data = tmp_path / "tldr"
    write_jsonl(str(data / "train.jsonl"), rows(16, 0))
    write_jsonl(str(data / "test.jsonl"), rows(3, 50))
    run = str(tmp_path / "run")
    launch("tldr", {"RUN": run, "DATA": str(data), "TEACHER": tiny_model_dir("llama"), "STUDENT": tiny_model_dir("llama"),
                    "GOLD_RM": make_rm("pair", str(tmp_path / "rm"))})
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["beta"] == 0.5
    res = json.load(open(os.path.join(run, "eval", "results.json")))
    assert "pair format" in res["setup"]["gold"] and len(res["policies"]) == 4
    gens = [json.loads(x) for x in open(os.path.join(run, "eval", "generations.jsonl"))]
    assert gens[0]["prompt"].endswith("failed.\n")  # TL;DR layout: the response starts on its own line


def test_unknown_preset():
    p = subprocess.run(["bash", os.path.join(ROOT, "launch.sh"), "nope"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown preset" in p.stderr
