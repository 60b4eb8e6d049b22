"""The family matrix's runs (tests/test_families.py): tiny random models of the families users fine-tune, built
from configs, taken through SFT and full DPO with a mid-run checkpoint, a crash and a resume, LoRA DPO, and
label.py. The scripts' main() functions are called in this process (no interpreter start per run), so a row
costs a few seconds.

pytest imports it for one process. For N processes one torchrun launch runs a whole list of rows:

    torchrun --nproc_per_node 2 tests/family_runs.py REPORT.json WORKDIR ROW [ROW ...]

and writes what each run found (tied after resume, final weights) to REPORT.json for the test to check.

The crash comes from outside the loop (inject.crash_before_update): every process raises just before the same
optimizer update, as a job whose processes are all killed at once; the checkpoint left behind is the one a kill
leaves."""
from __future__ import annotations

import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import inject  # noqa: E402

# row -> (model_type, config overrides, tied?). Tiny: 2 blocks, hidden 32. "tied" is what the row is for: the
# built model must have it, or the row would test the wrong thing (checked in build_model).
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ROWS = {
    "llama-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False), False),
    "llama-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True), True),  # SmolLM2, Llama-3.2
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), True),  # Qwen2.5 up to 3B
    "mistral": ("mistral", dict(num_key_value_heads=2, tie_word_embeddings=False), False),
    "gemma2-tied-softcap": ("gemma2", dict(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0,
                                           tie_word_embeddings=True), True),
    "phi3-fused": ("phi3", dict(num_key_value_heads=4, tie_word_embeddings=False), False),  # qkv_proj, gate_up_proj
    "opt-tied": ("opt", dict(ffn_dim=64, word_embed_proj_dim=16), True),  # the paper's teacher; dropout 0.1
    "gpt2-tied-conv1d": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128), True),  # dropout 0.1
    "gpt_neox": ("gpt_neox", dict(tie_word_embeddings=False), False),
}
WORDS = ("the quick brown fox jumps over lazy dog bake bread at home mix flour water salt yeast then let it "
         "rise summaries should be short keep brief say what matters first sort numbers").split()
PROBE = "Human: how do I bake bread? Assistant: mix flour, water and salt"


def is_tied(model) -> bool:
    """The output head is the input embedding: one parameter, one storage."""
    out, inp = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return out is inp


def build_model(row: str, tok, out_dir: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM
    family, over, tied = ROWS[row]
    cfg = AutoConfig.for_model(family, vocab_size=len(tok), **{**COMMON, **over})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert is_tied(model) == tied, f"{row}: built model tied={is_tied(model)}, the row needs {tied}"
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def write_pairs(path: str, n: int, seed: int) -> str:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    with open(path, "w") as f:
        for _ in range(n):
            chosen, rejected = " " + text(1, 6), " " + text(1, 6)
            if rejected == chosen:
                rejected += " no"
            f.write(json.dumps({"prompt": f"Human: {text(2, 6)}? Assistant:", "chosen": chosen,
                                "rejected": rejected}) + "\n")
    return path


def call_main(module, argv: list[str]) -> None:
    """module.main() as `python SCRIPT ARGV` would run it, in this process."""
    saved = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        module.main()
    finally:
        sys.argv = saved


def train_run(module, argv: list[str], seen: dict) -> None:
    """One training run; seen receives what the run's own objects showed: "tied_after_resume" (is the head still
    the input embedding right after load_checkpoint), "logits" (the trained model's, on PROBE, before the
    final save). The hooks wrap lib functions from outside; the scripts are unchanged."""
    from lib import checkpoint, dist, trainer
    load, save = checkpoint.load_checkpoint, trainer.save_final

    def load_and_look(path, model, opt, sched):
        load(path, model, opt, sched)
        seen["tied_after_resume"] = is_tied(model)

    def look_and_save(args, model, tok, keep, opt, stats, inputs):
        ids = tok(PROBE, return_tensors="pt").input_ids.to(dist.device())
        was = model.training
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids).logits.float().cpu()
        model.train(was)
        save(args, model, tok, keep, opt, stats, inputs)
    checkpoint.load_checkpoint, trainer.save_final = load_and_look, look_and_save
    try:
        call_main(module, argv)
    finally:
        checkpoint.load_checkpoint, trainer.save_final = load, save


def checkpoint_keys(folder: str) -> list[str]:
    """The model tensors' names in a mid-run checkpoint's shard files (each rank's files name its pieces of
    the same tensors: each name once)."""
    from safetensors import safe_open
    keys = []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as s:
                keys += [k for k in s.keys() if k.startswith("model.")]
    return sorted(set(keys))


def kill_and_resume(module, argv: list[str], work: str, name: str, crash_step: int) -> dict:
    """An uninterrupted run, a run that crashes before update crash_step (after a checkpoint), and its resume.
    Returns {"full": out, "cut": out, "checkpoint_keys": [...], "resume": seen, "full_seen": seen}."""
    from lib import dist
    full, cut = os.path.join(work, name + "-full"), os.path.join(work, name + "-cut")
    full_seen, cut_seen = {}, {}
    train_run(module, [*argv, "--out", full], full_seen)
    try:
        with inject.crash_before_update(crash_step):
            train_run(module, [*argv, "--out", cut], {})
        raise AssertionError(f"{name}: the injected crash did not happen")
    except inject.Crash:
        pass
    dist.barrier()
    keys = checkpoint_keys(os.path.join(cut, "checkpoint"))
    train_run(module, [*argv, "--out", cut, "--resume"], cut_seen)
    return {"full": full, "cut": cut, "checkpoint_keys": keys, "resume": cut_seen, "full_seen": full_seen}


def run_row(row: str, work: str, tok=None, lora_and_label: bool = True) -> dict:
    """Everything a row checks, run here; returns what the test asserts on. SFT and full DPO: 4 steps of
    4 pairs, a checkpoint every 2, a crash before update 3, a resume. Then (lora_and_label) LoRA DPO and
    label.py with the adapter on/off, with the merged LoRA model and its reference as two models, and with
    the full-DPO model and its reference."""
    import shutil
    import label
    import train_dpo
    import train_sft
    from conftest import make_bpe_tokenizer
    os.makedirs(work, exist_ok=True)
    tok = tok or make_bpe_tokenizer()
    base = build_model(row, tok, os.path.join(work, "base"))
    data = write_pairs(os.path.join(work, "pairs.jsonl"), 16, seed=len(row))
    common = ["--data", data, "--batch-size", "4", "--max-steps", "4", "--save-every", "2", "--eval-pairs", "0",
              "--seed", "5"]
    rep = {"row": row, "tied": ROWS[row][2], "base": base}
    rep["sft"] = kill_and_resume(train_sft, ["--model", base, *common, "--lr", "1e-2"], work, "sft", 3)
    sft = rep["sft"]["full"]
    rep["dpo"] = kill_and_resume(train_dpo, ["--model", sft, *common, "--lora-rank", "0", "--lr", "1e-3"], work,
                                 "dpo", 3)
    if not lora_and_label:
        return rep
    lora = os.path.join(work, "lora")
    call_main(train_dpo, ["--model", sft, "--data", data, "--batch-size", "4", "--max-steps", "2", "--eval-pairs",
                          "0", "--lora-rank", "4", "--lr", "5e-2", "--out", lora])
    merged = os.path.join(work, "lora-merged")  # the merged checkpoint alone: label.py then loads two models
    shutil.copytree(lora, merged, ignore=shutil.ignore_patterns("adapter"))
    rep["lora"] = lora
    rep["labels"] = {}
    for name, pol in (("adapter", lora), ("merged", merged), ("full", rep["dpo"]["full"])):
        out = os.path.join(work, f"weak-{name}.jsonl")
        call_main(label, ["--model", pol, "--ref", sft, "--data", data, "--out", out, "--batch-size", "5"])
        rep["labels"][name] = out
    return rep


def main() -> None:
    """torchrun entry: run the rows named on the command line, write the report, leave like the scripts do."""
    report_path, work, *rows = sys.argv[1:]
    from lib import dist
    from lib.dist import rank
    dist.init_distributed()
    reports = {}
    for row in rows:
        rep = run_row(row, os.path.join(work, row), lora_and_label=False)
        for kind in ("sft", "dpo"):
            rep[kind]["full_seen"].pop("logits", None)
            rep[kind]["resume"].pop("logits", None)
        reports[row] = rep
    if rank() == 0:
        with open(report_path, "w") as f:
            json.dump(reports, f)
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)  # as lib.signals.run_main ends a multi-process run (dist.leave_process_group)


if __name__ == "__main__":
    main()
