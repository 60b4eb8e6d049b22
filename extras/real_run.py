"""A real pretrained model through SFT, full DPO and labeling, each stage killed (SIGKILL, from outside) after
its first checkpoint and resumed, and compared with an uninterrupted run of the same command.

    python extras/real_run.py --model SmolLM2-135M-Instruct --hh harmless-base.jsonl --out /tmp/real-run

--model: a local model folder (SmolLM2-135M-Instruct ties its embeddings, as most small chat models do);
--hh: Anthropic/hh-rlhf rows in the hub's raw layout ({"chosen": dialogue, "rejected": dialogue} per line).
The first --pairs pairs train (SFT on the chosen responses, then full DPO from the SFT model), the next --pairs
are labeled by the DPO model against the SFT model. Each trainer runs twice: once uninterrupted, once killed as
soon as its first mid-run checkpoint is complete and rerun with --resume; label.py is killed after its first
batch and rerun. Prints, and writes to OUT/report.json, the seconds of each uninterrupted stage and whether the
resumed output is bit-equal to the uninterrupted one. Exit code 1 when one is not.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local folder of the pretrained causal LM to fine-tune")
    ap.add_argument("--hh", required=True, help="HH-RLHF rows, raw hub layout (.jsonl or .jsonl.gz)")
    ap.add_argument("--out", required=True, help="work folder (created; every stage's output goes below it)")
    ap.add_argument("--pairs", type=int, default=24, help="pairs to train on, and as many to label")
    ap.add_argument("--max-len", type=int, default=256, help="tokens per sequence, every stage")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    ap.add_argument("--save-every", type=int, default=2, help="optimizer steps between mid-run checkpoints")
    return ap.parse_args()


def write_pairs(args) -> tuple[str, str]:
    """OUT/train.jsonl and OUT/label.jsonl: the first 2 x --pairs rows of --hh that split into pairs."""
    from lib.data import read_pairs
    pairs = read_pairs(args.hh)
    if len(pairs) < 2 * args.pairs:
        raise SystemExit(f"error: {args.hh}: {len(pairs)} usable pairs, need {2 * args.pairs} (lower --pairs)")
    paths = []
    for name, part in (("train", pairs[:args.pairs]), ("label", pairs[args.pairs:2 * args.pairs])):
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in part)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths[0], paths[1]


def run(cmd: list[str]) -> float:
    """Run to the end; returns the seconds it took. A failure stops everything."""
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return time.time() - t


def run_and_kill(cmd: list[str], ready) -> None:
    """Start cmd, SIGKILL it as soon as ready() is true (polled), and check that it really died early."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and not ready():
        time.sleep(0.05)
    if p.poll() is not None:
        raise SystemExit(f"error: {' '.join(cmd)} ended ({p.returncode}) before the point it was to be killed at")
    p.send_signal(signal.SIGKILL)
    p.wait()


def same_files(a: str, b: str) -> bool:
    with open(a, "rb") as x, open(b, "rb") as y:
        return x.read() == y.read()


def same_weights(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file
    x, y = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def trainer_stage(script: str, argv: list[str], out: str) -> dict:
    """Uninterrupted run into OUT-full; killed-and-resumed run into OUT-cut. Their figures."""
    py = [sys.executable, os.path.join(ROOT, script)]
    full, cut = out + "-full", out + "-cut"
    seconds = run(py + argv + ["--out", full])
    state = os.path.join(cut, "checkpoint", "state.pt")
    run_and_kill(py + argv + ["--out", cut], lambda: os.path.isfile(state))
    import torch
    killed_at = torch.load(state, weights_only=True)["step"]
    resume_seconds = run(py + argv + ["--out", cut, "--resume"])
    steps = sum(1 for _ in open(os.path.join(full, "metrics.jsonl")))
    return {"seconds": round(seconds, 1), "steps": steps, "killed_after_checkpoint_of_step": killed_at,
            "resume_seconds": round(resume_seconds, 1), "resumed_bit_equal": same_weights(full, cut), "out": full}


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    train, unlabeled = write_pairs(args)
    common = ["--data", train, "--max-len", str(args.max_len), "--batch-size", str(args.batch_size),
              "--save-every", str(args.save_every), "--eval-pairs", "0", "--seed", "1"]
    report = {"model": os.path.abspath(args.model), "pairs": args.pairs, "max_len": args.max_len}
    report["sft"] = trainer_stage("train_sft.py", ["--model", args.model, *common, "--lr", "1e-5"],
                                  os.path.join(args.out, "sft"))
    sft = report["sft"]["out"]
    report["dpo"] = trainer_stage("train_dpo.py", ["--model", sft, *common, "--lora-rank", "0", "--lr", "1e-6",
                                                   "--beta", "0.1"], os.path.join(args.out, "dpo"))
    py = [sys.executable, os.path.join(ROOT, "label.py"), "--model", report["dpo"]["out"], "--ref", sft, "--data",
          unlabeled, "--max-len", str(args.max_len), "--batch-size", "4"]
    full, cut = os.path.join(args.out, "weak-full.jsonl"), os.path.join(args.out, "weak-cut.jsonl")
    seconds = run(py + ["--out", full])
    part = cut + ".partial"
    run_and_kill(py + ["--out", cut], lambda: os.path.isdir(part) and any(
        f.startswith("rank-") and os.path.getsize(os.path.join(part, f)) for f in os.listdir(part)))
    resume_seconds = run(py + ["--out", cut])
    report["label"] = {"seconds": round(seconds, 1), "resume_seconds": round(resume_seconds, 1),
                       "resumed_bit_equal": same_files(full, cut), "out": full}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    for stage in ("sft", "dpo", "label"):
        r = report[stage]
        print(f"{stage}: {r['seconds']} s uninterrupted, resumed run {r['resume_seconds']} s, "
              f"bit-equal {'yes' if r['resumed_bit_equal'] else 'NO'}")
    sys.exit(0 if all(report[s]["resumed_bit_equal"] for s in ("sft", "dpo", "label")) else 1)


if __name__ == "__main__":
    main()
