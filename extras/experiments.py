"""The paper's ablations and analyses as one-command experiments, on top of launch.sh's pipeline.

    python extras/experiments.py fractions   labeled-fraction sweep 1/16 .. 1/2 (paper Fig. 4a)
    python extras/experiments.py teachers    supervisor sweep: teachers of several sizes, optionally an LLM judge
                                             (Fig. 2b, Table 12)
    python extras/experiments.py subsets     the student on D_u's match / mismatch subsets and all of D_u, weak vs
                                             human labels (Table 1), plus random label noise at the weak labels'
                                             agreement rate (Table 11)
    python extras/experiments.py beta        beta sweep of the student's DPO (Fig. 7)
    python extras/experiments.py seeds       data-split seed repeats, mean and standard deviation (appendix C)
    python extras/experiments.py sft-ref     DPO with and without the SFT reference (appendix C)
    python extras/experiments.py all         every one of them
    bash launch.sh synthetic fractions       the same, through launch.sh

Every experiment starts from finished pipelines (`bash launch.sh PRESET`, run here when missing; a run whose
stages are complete is reused, as launch.sh always does), adds only the stages it needs, and writes
ROOT/NAME/results.md (a table laid out like the paper's), results.json, and PNG plots when matplotlib is
installed. The base run is runs/PRESET, the pipeline launch.sh makes by default; sweeps over whole pipelines
(fractions, seeds) make ROOT/NAME/VALUE runs. Settings come from the same environment variables as launch.sh
(NPROC, PREPARE_ARGS, SFT_ARGS, DPO_ARGS, LABEL_ARGS, EVAL_ARGS, ...), so a CI-sized world is one
PREPARE_ARGS away. With NPROC=1 the added stages run inside this process, each script run as `python SCRIPT`
runs it (runpy: no interpreter start-up per stage); with NPROC > 1 under torchrun.
"""
import argparse
import json
import math
import os
import random
import runpy
import shlex
import statistics
import subprocess
import sys

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's root
sys.path.insert(0, ROOT_DIR)
from lib import runs, synthetic  # noqa: E402
from lib.console import WltError, log  # noqa: E402
from lib.data import relabeled_row, swap_pair  # noqa: E402
from lib.files import iter_jsonl, write_json, write_jsonl, write_text  # noqa: E402
from lib.models import load_model, load_tokenizer  # noqa: E402
from lib.signals import run_main
EXPERIMENTS = ["fractions", "teachers", "subsets", "beta", "seeds", "sft-ref"]
DEFAULT_VALUES = {"fractions": "0.0625,0.125,0.25,0.5", "beta": "0.1,0.25,0.5,1.0", "seeds": "22,23,24,25,26",
                  "teachers": "1x32,2x64,4x128"}


# ---------------------------------------------------------------------------------------------------------
# running stages

def env_args(name: str) -> list[str]:
    return shlex.split(os.environ.get(name, ""))


def stage(script: str, *argv: str) -> None:
    """One stage script with these flags: in this process (NPROC=1), or under torchrun."""
    nproc = int(os.environ.get("NPROC", "1"))
    if nproc > 1:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                            os.path.join(ROOT_DIR, script), *argv])
        if p.returncode != 0:
            raise WltError(f"{script} {' '.join(argv)} failed (exit code {p.returncode}; its output above)")
        return
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        runpy.run_path(os.path.join(ROOT_DIR, script), run_name="__main__")
    finally:
        sys.argv = saved


def pipeline(preset: str, run: str, **env) -> str:
    """A whole pipeline in `run` (launch.sh; finished stages are skipped). Returns run."""
    e = dict(os.environ, RUN=os.path.abspath(run), **{k: str(v) for k, v in env.items()})
    if os.path.normpath(run) == os.path.join("runs", preset) and os.path.abspath(os.getcwd()) == ROOT_DIR:
        del e["RUN"]  # launch.sh's own default run, named as launch.sh names it (so its stages are reused)
    e.setdefault("PYTHON", sys.executable)  # the stages run with this interpreter (and its packages)
    log(f"experiments: pipeline {run} ({', '.join(f'{k}={v}' for k, v in env.items()) or 'defaults'})")
    p = subprocess.run(["bash", os.path.join(ROOT_DIR, "launch.sh"), preset], env=e)
    if p.returncode != 0:
        raise WltError(f"the pipeline in {run} failed (launch.sh {preset}, exit code {p.returncode}; its output above)")
    return run


def student_dpo(run: str, data: str, out: str, *extra: str) -> str:
    """The student's DPO (the run's student settings) on `data` into `out`. Returns out."""
    stage("train_dpo.py", "--student", "--labels", "human", "--run-dir", run, "--data", data, "--out", out, "--resume",
          *env_args("DPO_ARGS"), *extra)
    return out


def evaluate(run: str, out: str, policies: dict[str, str]) -> dict:
    """evaluate.py on the run's test prompts for these policies; returns results.json."""
    argv = ["--run-dir", run, "--out", out]
    for name, path in policies.items():
        argv += ["--policy", f"{name}={path}"]
    gold = os.environ.get("GOLD_RM")
    stage("evaluate.py", *argv, *(["--gold-rm", gold] if gold else []), *env_args("EVAL_ARGS"))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def gold_accuracy(rows: list[dict]) -> float | None:
    """Share of pairs whose chosen response has the higher exact gold reward (synthetic world), else None."""
    if not rows or not all("gold_chosen" in r and "gold_rejected" in r for r in rows):
        return None
    return sum(r["gold_chosen"] > r["gold_rejected"] for r in rows) / len(rows)


# ---------------------------------------------------------------------------------------------------------
# tables and plots

def fmt(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def reward(res: dict, name: str) -> str:
    p = res["policies"].get(name)
    return "—" if p is None else f"{p['mean']:.3f} ± {p['se']:.3f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot(path: str, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]], logx=False,
         hist: bool = False) -> str | None:
    """A PNG when matplotlib is installed (it is not a dependency), else None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, (xs, ys) in series.items():
        if hist:
            ax.hist(xs, bins=40, alpha=0.5, label=name, density=True)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out: str, title: str, md: str, data: dict, plots: list) -> str:
    plots = [p for p in plots if p]
    if plots:
        md += "\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots)
    text = f"# {title}\n\n{md}\n"
    write_text(os.path.join(out, "results.md"), text)
    write_json(os.path.join(out, "results.json"), data)
    log("\n" + text)
    return text


def run_summary(run: str) -> dict:
    """The numbers of a finished pipeline: eval results, labels, split sizes."""
    with open(os.path.join(run, "eval", "results.json")) as f:
        res = json.load(f)
    with open(runs.summary_path(os.path.join(run, "data", "weak.jsonl"))) as f:
        weak = json.load(f)
    counts = runs.read_run_config(run)["counts"]
    lq = res.get("label_quality", {})
    return {"results": res, "labeled": counts["labeled"]["kept"], "unlabeled": counts["unlabeled"]["kept"],
            "agreement": weak["agreement_with_input"], "gold_accuracy": lq.get("gold_accuracy", {})}


# ---------------------------------------------------------------------------------------------------------
# the experiments

def exp_fractions(a) -> dict:
    """Paper Fig. 4a: the share of the training pairs that keeps human labels (D_l), the rest labeled weakly."""
    rows, data, xs, ys = [], {}, [], {"pi_weak": [], "pi_human": [], "SFT": []}
    for v in a.values:
        f = float(v)
        s = run_summary(pipeline(a.preset, os.path.join(a.root, "fractions", f"fraction-{v}"), LABELED_FRACTION=f))
        res, ga = s["results"], s["gold_accuracy"]
        rows.append([v, s["labeled"], s["unlabeled"], pct(ga.get("human")), pct(ga.get("weak")), pct(s["agreement"]),
                     reward(res, "sft"), reward(res, "human"), reward(res, "weak"),
                     fmt(res["policies"]["weak"]["mean"] - res["policies"]["human"]["mean"])])
        data[v] = s
        xs.append(f)
        for k, n in (("pi_weak", "weak"), ("pi_human", "human"), ("SFT", "sft")):
            ys[k].append(res["policies"][n]["mean"])
    md = table(["labeled fraction", "D_l pairs", "D_u pairs", "human labels gold-acc.", "weak labels gold-acc.",
                "agreement", "SFT", "pi_human", "pi_weak", "pi_weak - pi_human"], rows)
    png = plot(os.path.join(a.out, "reward_vs_fraction.png"), "Gold reward vs labeled fraction", "labeled fraction",
               "gold reward", {k: (xs, v) for k, v in ys.items()}, logx=True)
    return {"md": md, "data": data, "plots": [png], "title": "Labeled-fraction sweep (paper Fig. 4a)"}


def exp_seeds(a) -> dict:
    """Paper appendix C: the data split repeated with several seeds; mean and standard deviation."""
    rows, data, cols = [], {}, {"pi_weak": [], "pi_human": [], "diff": [], "agreement": []}
    for v in a.values:
        run = a.base if int(v) == int(os.environ.get("SEED", "22")) else os.path.join(a.root, "seeds", f"seed-{v}")
        s = run_summary(pipeline(a.preset, run, SEED=int(v)))
        pw, ph = s["results"]["policies"]["weak"]["mean"], s["results"]["policies"]["human"]["mean"]
        rows.append([v, fmt(pw), fmt(ph), fmt(pw - ph), pct(s["agreement"]), pct(s["gold_accuracy"].get("weak"))])
        for k, x in (("pi_weak", pw), ("pi_human", ph), ("diff", pw - ph), ("agreement", s["agreement"])):
            cols[k].append(x)
        data[v] = s
    stats = {k: {"mean": statistics.fmean(x), "std": statistics.stdev(x) if len(x) > 1 else None,
                 "variance": statistics.variance(x) if len(x) > 1 else None} for k, x in cols.items()}
    rows.append(["mean", *(fmt(stats[k]["mean"]) for k in ("pi_weak", "pi_human", "diff")),
                 pct(stats["agreement"]["mean"]), ""])
    rows.append(["std", *(fmt(stats[k]["std"]) for k in ("pi_weak", "pi_human", "diff")),
                 pct(stats["agreement"]["std"]) if stats["agreement"]["std"] is not None else "—", ""])
    md = table(["split seed", "pi_weak", "pi_human", "pi_weak - pi_human", "agreement", "weak labels gold-acc."], rows)
    return {"md": md, "data": {"runs": data, "stats": stats}, "plots": [], "title": "Split-seed repeats (paper appendix C)"}


def exp_beta(a) -> dict:
    """Paper Fig. 7: the student's DPO beta, on weak and on human labels, from the same SFT reference."""
    run, cfg = a.base, runs.read_run_config(a.base)
    run_beta = cfg.get("beta")
    pols = {"sft": os.path.join(run, "student", "sft")}
    for v in a.values:
        for labels, data in (("weak", "weak.jsonl"), ("human", "unlabeled.jsonl")):
            if run_beta is not None and float(v) == float(run_beta) and "--beta" not in env_args("DPO_ARGS"):
                pols[f"{labels}-beta{v}"] = os.path.join(run, "student", f"dpo-{labels}")  # the pipeline's own
            else:
                pols[f"{labels}-beta{v}"] = student_dpo(run, os.path.join(run, "data", data),
                                                        os.path.join(a.out, f"dpo-{labels}-beta{v}"), "--beta", v)
    res = evaluate(run, os.path.join(a.out, "eval"), pols)
    rows = []
    xs, ys = [], {"pi_weak": [], "pi_human": []}
    for v in a.values:
        w, h = res["policies"][f"weak-beta{v}"], res["policies"][f"human-beta{v}"]
        rows.append([v, f"{w['mean']:.3f} ± {w['se']:.3f}", f"{h['mean']:.3f} ± {h['se']:.3f}", fmt(w["mean"] - h["mean"])])
        xs.append(float(v))
        ys["pi_weak"].append(w["mean"])
        ys["pi_human"].append(h["mean"])
    rows.append(["(SFT reference)", reward(res, "sft"), "", ""])
    md = table(["beta", "pi_weak", "pi_human", "pi_weak - pi_human"], rows)
    png = plot(os.path.join(a.out, "reward_vs_beta.png"), "Gold reward vs beta", "beta", "gold reward",
               {k: (xs, v) for k, v in ys.items()}, logx=True)
    return {"md": md, "data": res, "plots": [png], "title": "Beta sweep of the student's DPO (paper Fig. 7)"}


def exp_subsets(a) -> dict:
    """Paper Table 1 (match / mismatch subsets of D_u, weak vs human labels) and Table 11 (random label noise at
    the weak labels' agreement rate, in place of the weak labels)."""
    run = a.base
    weak = read_jsonl(os.path.join(run, "data", "weak.jsonl"))
    human = read_jsonl(os.path.join(run, "data", "unlabeled.jsonl"))

    match = [r for r in weak if r["human_agrees"]]
    mismatch_weak = [r for r in weak if not r["human_agrees"]]
    # weak.jsonl keeps the teacher's order: on the mismatches the human order is the other one
    mismatch_human = [relabeled_row(r, False, r["chosen_reward"], r["rejected_reward"]) for r in mismatch_weak]
    flip_rate = len(mismatch_weak) / len(weak)
    rng = random.Random(a.seed)
    noise = [swap_pair(r) if rng.random() < flip_rate else r for r in human]
    d = os.path.join(a.out, "data")
    sets = {"match": match, "mismatch-weak": mismatch_weak, "mismatch-human": mismatch_human, "noise": noise}
    for name, rows in sets.items():
        path = os.path.join(d, f"{name}.jsonl")
        if not os.path.isfile(path) or read_jsonl(path) != json.loads(json.dumps(rows)):
            os.makedirs(d, exist_ok=True)
            write_jsonl(path, rows)
    pols = {"sft": os.path.join(run, "student", "sft")}
    for name in sets:
        pols[name] = student_dpo(run, os.path.join(d, f"{name}.jsonl"), os.path.join(a.out, f"dpo-{name}"))
    pols["all-weak"] = os.path.join(run, "student", "dpo-weak")
    pols["all-human"] = os.path.join(run, "student", "dpo-human")
    res = evaluate(run, os.path.join(a.out, "eval"), pols)

    def row(label: str, labels: str, name: str, rows: list[dict]) -> list:
        p = res["policies"][name]
        vs = p.get("vs_sft")
        return [label, labels, len(rows), pct(gold_accuracy(rows)), f"{p['mean']:.3f} ± {p['se']:.3f}",
                f"{vs['delta']:+.3f} ± {vs['se']:.3f}" if vs else "—"]
    rows = [row("D_u match", "weak = human", "match", match),
            row("D_u mismatch", "weak", "mismatch-weak", mismatch_weak),
            row("D_u mismatch", "human", "mismatch-human", mismatch_human),
            row("D_u", "weak", "all-weak", weak),
            row("D_u", "human", "all-human", human),
            row("D_u", f"human, {100 * flip_rate:.1f}% flipped at random", "noise", noise),
            ["(SFT reference)", "", "", "", reward(res, "sft"), ""]]
    md = table(["training data", "labels", "pairs", "labels gold-acc.", "gold reward", "vs SFT (paired)"], rows)
    md += (f"\n\nThe random-noise control (paper Table 11) flips each human label with probability {flip_rate:.3f}, the "
           f"share of D_u where the weak labels disagree with the human ones: same amount of disagreement, no teacher.")
    margins = {"match": [r["chosen_reward"] - r["rejected_reward"] for r in match],
               "mismatch": [r["chosen_reward"] - r["rejected_reward"] for r in mismatch_weak]}
    png = plot(os.path.join(a.out, "margins_match_vs_mismatch.png"), "Teacher reward margin", "r(chosen) - r(rejected)",
               "density", {k: (v, None) for k, v in margins.items()}, hist=True)
    data = {"eval": res, "flip_rate": flip_rate, "pairs": {k: len(v) for k, v in sets.items()},
            "margin_mean": {k: statistics.fmean(v) if v else None for k, v in margins.items()}}
    return {"md": md, "data": data, "plots": [png],
            "title": "Match / mismatch subsets (paper Table 1) and random noise (paper Table 11)"}


def exp_sft_ref(a) -> dict:
    """Paper appendix C: the student's DPO started from, and anchored to, the base model instead of its SFT."""
    run = a.base
    base_model = runs.read_run_config(run)["student_model"]
    pols = {"base": base_model, "sft": os.path.join(run, "student", "sft"),
            "weak": os.path.join(run, "student", "dpo-weak"), "human": os.path.join(run, "student", "dpo-human")}
    for labels, data in (("weak", "weak.jsonl"), ("human", "unlabeled.jsonl")):
        pols[f"nosft-{labels}"] = student_dpo(run, os.path.join(run, "data", data), os.path.join(a.out, f"dpo-{labels}"),
                                              "--model", base_model)
    res = evaluate(run, os.path.join(a.out, "eval"), pols)
    rows = [["SFT, then DPO (reference = SFT)", reward(res, "weak"), reward(res, "human")],
            ["DPO without SFT (start and reference = base)", reward(res, "nosft-weak"), reward(res, "nosft-human")],
            ["(base model)", reward(res, "base"), ""], ["(SFT model)", reward(res, "sft"), ""]]
    md = table(["student", "weak labels", "human labels"], rows)
    return {"md": md, "data": res, "plots": [], "title": "DPO with and without the SFT reference (paper appendix C)"}


def exp_teachers(a) -> dict:
    """Paper Fig. 2b / Table 12: the same student aligned on the labels of teachers of different sizes (and, with
    --judge, of an LLM judge), against the human labels."""
    run, cfg = a.base, runs.read_run_config(a.base)
    in_synthetic_world = cfg.get("source") == "synthetic"
    pols = {"sft": os.path.join(run, "student", "sft"), "human": os.path.join(run, "student", "dpo-human")}
    info = {}
    for v in a.values:
        d = os.path.join(a.out, v.replace("/", "_"))
        if in_synthetic_world:  # a shape "LAYERSxHIDDEN" of the synthetic world's tiny Llama
            layers, hidden = (int(x) for x in v.split("x"))
            base = os.path.join(d, "base")
            if not os.path.isfile(os.path.join(base, "config.json")):
                tok = load_tokenizer(cfg["teacher_model"])
                synthetic.make_model(tok, {"hidden_size": hidden, "num_hidden_layers": layers,
                                               "num_attention_heads": 4, "intermediate_size": 4 * hidden,
                                               "tie_word_embeddings": synthetic.TEACHER_SHAPE["tie_word_embeddings"]},
                                         cfg["seed"], base)
        else:
            base = v
        stage("train_sft.py", "--teacher", "--run-dir", run, "--model", base, "--out", os.path.join(d, "sft"), "--resume",
              *env_args("SFT_ARGS"))
        stage("train_dpo.py", "--teacher", "--run-dir", run, "--model", os.path.join(d, "sft"), "--out", os.path.join(d, "dpo"),
              "--resume", *env_args("DPO_ARGS"))
        labels = os.path.join(d, "weak.jsonl")
        stage("label.py", "--teacher", "--run-dir", run, "--model", os.path.join(d, "dpo"), "--ref", os.path.join(d, "sft"),
              "--out", labels, *env_args("LABEL_ARGS"))
        pols[f"weak-{v}"] = student_dpo(run, labels, os.path.join(d, "student-dpo"))
        with open(runs.summary_path(labels)) as f:
            s = json.load(f)
        n_params = sum(t.numel() for t in load_model(os.path.join(d, "sft")).parameters())
        info[v] = {"parameters": n_params, "agreement": s["agreement_with_input"],
                   "gold_accuracy": (s.get("gold_accuracy") or {}).get("weak")}
    if a.judge:
        import judge  # extras/judge.py, beside this file
        labels = os.path.join(a.out, "judge", "weak.jsonl")
        judge.label_pairs(judge.make_judge(a.judge, a.judge_model), os.path.join(run, "data", "unlabeled.jsonl"), labels)
        with open(runs.summary_path(labels)) as f:
            s = json.load(f)
        pols["weak-judge"] = student_dpo(run, labels, os.path.join(a.out, "judge", "student-dpo"))
        info["judge"] = {"parameters": None, "agreement": s["agreement_with_input"],
                         "gold_accuracy": (s.get("gold_accuracy") or {}).get("weak")}
    res = evaluate(run, os.path.join(a.out, "eval"), pols)
    rows = []
    for v, i in info.items():
        p = res["policies"][f"weak-{v}"]
        rows.append([v if v != "judge" else f"LLM judge ({a.judge_model or a.judge})",
                     f"{i['parameters'] / 1e6:.2f}M" if i["parameters"] else "—", pct(i["agreement"]),
                     pct(i["gold_accuracy"]), f"{p['mean']:.3f} ± {p['se']:.3f}"])
    ga = res.get("label_quality", {}).get("gold_accuracy", {})
    rows.append(["human labels", "", "100.0%", pct(ga.get("human")), reward(res, "human")])
    rows.append(["(SFT reference)", "", "", "", reward(res, "sft")])
    md = table(["supervisor", "teacher parameters", "agreement with human labels", "labels gold-acc.",
                "student gold reward"], rows)
    return {"md": md, "data": {"eval": res, "teachers": info}, "plots": [], "title": "Supervisor sweep (paper Fig. 2b, Table 12)"}


RUNNERS = {"fractions": exp_fractions, "teachers": exp_teachers, "subsets": exp_subsets, "beta": exp_beta,
           "seeds": exp_seeds, "sft-ref": exp_sft_ref}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("experiment", choices=EXPERIMENTS + ["all"], help="which experiment")
    ap.add_argument("--preset", default="synthetic", choices=["synthetic", "hh", "tldr"], help="launch.sh preset")
    ap.add_argument("--base", default=None, help="the base run (default: $RUN or runs/PRESET, launch.sh's own)")
    ap.add_argument("--root", default=None, help="where experiment outputs go (default: runs/PRESET-experiments)")
    ap.add_argument("--fractions", default=DEFAULT_VALUES["fractions"], help="fractions: labeled fractions to run")
    ap.add_argument("--betas", default=DEFAULT_VALUES["beta"], help="beta: the student's DPO betas")
    ap.add_argument("--seeds", default=DEFAULT_VALUES["seeds"], help="seeds: data-split seeds (22 is the paper's)")
    ap.add_argument("--teachers", default=None,
                    help="teachers: synthetic shapes LAYERSxHIDDEN (default " + DEFAULT_VALUES["teachers"]
                         + ") or, for hh/tldr, model names (default facebook/opt-125m,facebook/opt-350m,EleutherAI/pythia-160m)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-noise control (subsets)")
    ap.add_argument("--judge", default=None,
                    help="teachers: also label D_u with an LLM judge: a local HF chat model folder, or an "
                         "OpenAI-compatible base URL (http://host:port/v1); see extras/judge.py")
    ap.add_argument("--judge-model", default=None, help="the model name to ask at --judge's URL")
    args = ap.parse_args()
    args.base = args.base or os.environ.get("RUN") or os.path.join("runs", args.preset)
    os.environ.pop("RUN", None)  # every pipeline gets its own RUN below
    args.root = args.root or f"runs/{args.preset}-experiments"
    names = EXPERIMENTS if args.experiment == "all" else [args.experiment]
    pipeline(args.preset, args.base)  # the base run (reused when complete)
    for name in names:
        a = argparse.Namespace(**vars(args))
        teachers = args.teachers or (DEFAULT_VALUES["teachers"] if args.preset == "synthetic"
                                     else "facebook/opt-125m,facebook/opt-350m,EleutherAI/pythia-160m")
        a.values = {"fractions": args.fractions, "beta": args.betas, "seeds": args.seeds,
                    "teachers": teachers}.get(name, "").split(",")
        a.out = os.path.join(args.root, name)
        os.makedirs(a.out, exist_ok=True)
        r = RUNNERS[name](a)
        write_results(a.out, r["title"], r["md"], r["data"], r["plots"])


if __name__ == "__main__":
    run_main(main)
