"""Rules of the trainers that a reviewer found broken once: --resume must look at inputs as well as flags,
a restarted run must not look finished, full-fine-tune DPO gets its own learning rate, the logged lr is the
one the step used, and prompts with no tokens are skipped. The trainers run in-process (fast) on a tiny
Llama and a dozen pairs."""
import json
import math
import os
import sys

import pytest

from lib import models, trainer
from lib.console import WltError
import train_dpo
from conftest import make_bpe_tokenizer

PAIRS = [{"prompt": f"Human: question {i}? Assistant:", "chosen": f" a good answer {i}.",
          "rejected": f" bad {i}"} for i in range(12)]


def write_pairs(path, pairs):
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    return str(path)


def run(monkeypatch, script, *argv):
    monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", *argv])
    script.main()


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_resume_checks_inputs_and_restarts_cleanly(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    out = str(tmp_path / "dpo")
    argv = ["--model", tiny_model_dir("llama"), "--data", data, "--out", out, "--batch-size", "4",
            "--eval-pairs", "0", "--max-steps", "2", "--resume"]
    run(monkeypatch, train_dpo, *argv)
    assert os.path.isdir(os.path.join(out, "adapter"))
    capsys.readouterr()
    run(monkeypatch, train_dpo, *argv)  # same flags, same inputs: nothing to do
    assert "nothing to do" in capsys.readouterr().out

    write_pairs(tmp_path / "pairs.jsonl", PAIRS + PAIRS[:2])  # the input changed: train again
    run(monkeypatch, train_dpo, *argv)
    assert "training again" in capsys.readouterr().out
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert cfg["data"]["pairs"] == 14

    # other settings without --resume: refused, nothing done, until --overwrite
    with pytest.raises(WltError, match=r"holds a finished run of other settings or inputs \(.*--lora-rank \d+ -> 0"
                                       r".*\); nothing done"):
        run(monkeypatch, train_dpo, *argv[:-1], "--lora-rank", "0")

    # a crash after the start leaves the finished run whole and marked finished (the new one would have been
    # swapped in only once complete), and no staging folder
    def crash(*a, **k):
        raise RuntimeError("killed")
    monkeypatch.setattr(models, "setup_model", crash)
    with pytest.raises(RuntimeError):
        run(monkeypatch, train_dpo, *argv[:-1], "--lora-rank", "0", "--overwrite")
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert cfg["data"]["pairs"] == 14 and cfg["args"]["lora_rank"] == 8 and cfg["script"] == "train_dpo.py"
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert not os.path.exists(out + ".staging")


def test_full_dpo_learning_rate_and_logged_lr(tmp_path, tiny_model_dir, monkeypatch):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    out = str(tmp_path / "full")
    # 4 steps, warmup 2: the step-1 rate is half the peak, then the peak, then cosine: 1, 0.5
    run(monkeypatch, train_dpo, "--model", tiny_model_dir("llama"), "--data", data, "--out", out,
        "--batch-size", "3", "--eval-pairs", "0", "--lora-rank", "0", "--warmup-ratio", "0.5",
        "--max-grad-norm", "0")
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert cfg["args"]["lr"] == 5e-7  # full fine-tune default, 100x below the LoRA default (docs/training.md)
    rows = metrics(out)
    assert [r["lr"] / 5e-7 for r in rows] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert not os.path.exists(os.path.join(out, "adapter"))
    # no clipping still reports a real gradient norm (valid JSON, no NaN)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)


def test_run_mode_full_dpo_uses_the_runs_full_rate(tmp_path, monkeypatch):
    """In a run folder the run's config gives LoRA and full fine-tuning different rates."""
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"train": {"train_dpo.py": {"teacher": {"lr_lora": 0.25, "lr_full": 0.125, "beta": 0.3}}}}, f)
    os.makedirs(os.path.join(run_dir, "teacher", "sft"))  # the teacher's DPO starts from a finished SFT
    open(os.path.join(run_dir, "teacher", "sft", "train_config.json"), "w").write("{}")
    seen = {}

    def stop(args, kind):
        seen["args"] = args
        return None  # as if finished: main returns before any model is loaded
    monkeypatch.setattr(trainer, "begin", stop)
    run(monkeypatch, train_dpo, "--teacher", "--run-dir", run_dir, "--lora-rank", "0")
    assert seen["args"].lr == 0.125 and seen["args"].beta == 0.3
    run(monkeypatch, train_dpo, "--teacher", "--run-dir", run_dir)
    assert seen["args"].lr == 0.25
    run(monkeypatch, train_dpo, "--teacher", "--run-dir", run_dir, "--lr", "0.5", "--beta", "0.1")
    assert seen["args"].lr == 0.5 and seen["args"].beta == 0.1  # explicit flags win
    with pytest.raises(WltError, match="--labels"):
        run(monkeypatch, train_dpo, "--student", "--run-dir", run_dir)


def test_empty_prompt_without_bos_is_skipped_and_counted(tmp_path):
    from tokenizers import processors
    tok = make_bpe_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A")  # no BOS, like GPT-2
    assert tok("").input_ids == []
    data = write_pairs(tmp_path / "p.jsonl", [{"prompt": "", "chosen": " yes", "rejected": " no"}] + PAIRS[:4])

    class Args:
        pass
    args = Args()
    args.data, args.strict, args.max_len, args.seed, args.eval_pairs = data, False, 64, 0, 0
    train, _, stats = trainer.load_examples(args, tok, "dpo")
    assert len(train) == 4 and stats["rows"] == 5
    assert list(stats["skipped"]["counts"].values()) == [1]
    assert stats["skipped"]["examples"][next(iter(stats["skipped"]["counts"]))] == [f"{data}:1"]
    args.strict = True
    with pytest.raises(WltError, match=f"{data}:1"):
        trainer.load_examples(args, tok, "dpo")


def test_reference_log_probs_are_cached_and_reused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """train_dpo.py writes the reference log-probs to --out/ref_logps.safetensors before the loop; a rerun with
    other optimisation settings (lr, beta) reuses them; other data recomputes them. The cached numbers are
    log pi_ref of each pair, checked against the model itself (one pair at a time, full softmax)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model_dir = tiny_model_dir("llama")
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    out = str(tmp_path / "dpo")
    argv = ["--model", model_dir, "--data", data, "--out", out, "--batch-size", "4", "--eval-pairs", "2",
            "--epochs", "2"]
    run(monkeypatch, train_dpo, *argv)
    assert "reused" not in capsys.readouterr().out
    cache = load_file(os.path.join(out, "ref_logps.safetensors"))
    # 12 pairs: 1 held out (at most a tenth), 11 trained on; [epochs, N_train, 2] and [N_eval, 2]
    assert cache["train"].shape == (2, 11, 2) and cache["eval"].shape == (1, 2)

    # the numbers: for each training pair, in both epochs, log pi_ref(chosen), log pi_ref(rejected)
    tok = make_bpe_tokenizer()
    train, evals, _ = trainer.load_examples(train_dpo_args(data), tok, "dpo")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, e in enumerate(train):
        for k, key in enumerate(("chosen_ids", "rejected_ids")):
            ids = torch.tensor([e["prompt_ids"] + e[key]])
            with torch.no_grad():
                lp = torch.log_softmax(ref(ids).logits[0, :-1].double(), -1)
            want = float(lp[torch.arange(len(e["prompt_ids"]) - 1, ids.shape[1] - 1), ids[0, len(e["prompt_ids"]):]].sum())
            for ep in range(2):
                assert cache["train"][ep, i, k].item() == pytest.approx(want, rel=1e-5, abs=1e-4)

    run(monkeypatch, train_dpo, *argv, "--lr", "1e-3", "--beta", "0.5", "--overwrite")  # optimisation changed: reused
    assert "reference log-probs reused" in capsys.readouterr().out
    write_pairs(tmp_path / "pairs.jsonl", PAIRS[:10])  # the data changed: computed again
    run(monkeypatch, train_dpo, *argv, "--overwrite")
    assert "computing the reference again" in capsys.readouterr().out
    assert load_file(os.path.join(out, "ref_logps.safetensors"))["train"].shape == (2, 9, 2)


def train_dpo_args(data):
    class Args:
        pass
    a = Args()
    a.data, a.strict, a.max_len, a.seed, a.eval_pairs = data, False, 512, 0, 2
    return a


def test_report_to_sends_each_row_under_trl_names(tmp_path, tiny_model_dir, monkeypatch):
    """--report-to tensorboard: every metrics.jsonl row reaches the writer under TRL's names at its step (a
    stand-in SummaryWriter: the suite does not install tensorboard); a tracker whose package is missing stops
    the run before it starts, in one line naming the package."""
    import types
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("log_dir", log_dir))

        def add_scalar(self, name, value, step):
            calls.append((name, value, step))

        def close(self):
            calls.append(("closed",))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    out = str(tmp_path / "dpo")
    run(monkeypatch, train_dpo, "--model", tiny_model_dir("llama"), "--data", data, "--out", out, "--batch-size", "4",
        "--eval-pairs", "2", "--eval-every", "1", "--max-steps", "2", "--report-to", "tensorboard")
    rows = metrics(out)
    assert calls[0] == ("log_dir", os.path.join(out, "tensorboard")) and calls[-1] == ("closed",)
    for r in rows:
        for ours, trl in (("loss", "train/loss"), ("rewards/chosen", "train/rewards/chosen"),
                          ("rewards/accuracies", "train/rewards/accuracies"), ("lr", "train/learning_rate"),
                          ("grad_norm", "train/grad_norm"), ("eval/rewards/margins", "eval/rewards/margins")):
            assert (trl, r[ours], r["step"]) in calls, (trl, r["step"])
    assert len(rows) == 2 and not any(c[0] == "step" for c in calls)

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(WltError, match=r"--report-to wandb: the wandb package is not installed; `pip install wandb`"):
        run(monkeypatch, train_dpo, "--model", tiny_model_dir("llama"), "--data", data, "--out", str(tmp_path / "w"),
            "--report-to", "wandb")
    assert not os.path.exists(tmp_path / "w")
