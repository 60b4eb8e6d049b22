"""Supervised fine-tuning on the chosen responses: the reference policy pi_ref of the paper, for the weak
teacher (on D_l) and for the student. A full fine-tune; the loss is on the response tokens only.

    torchrun train_sft.py --teacher                           in the default run folder, runs/synthetic
    torchrun --nproc_per_node 2 train_sft.py --student --run-dir runs/demo
    python train_sft.py --model facebook/opt-125m --data pairs.jsonl --out out/sft

Loss (wlt.sft_loss): the summed NLL of the chosen-response tokens of the global batch over the number of those
tokens, so that any number of processes and micro-batches takes the step one process takes on the whole batch.
Model dropout stays on. Output in --out: an HF checkpoint, metrics.jsonl, train_config.json (written last).
"""
import argparse

import torch

import wlt
from lib import dist, models, trainer
from lib.console import run_main, world_size
from lib.data import pad_id
from lib.defaults import SFT_LR


def build_parser() -> argparse.ArgumentParser:
    return trainer.argument_parser_for(__doc__, "sft")


def parse_args() -> argparse.Namespace:
    ap = build_parser()
    args, _ = trainer.parse_args(ap, "train_sft.py")
    if args.lr is None:
        args.lr = SFT_LR
    return args


def batch_of(exs: list[dict], pad: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Prompt + chosen response of each pair: input_ids, attention_mask, labels [B, T] on dev."""
    return {k: v.to(dev) for k, v in wlt.collate([(e["prompt_ids"], e["chosen_ids"]) for e in exs], pad).items()}


def held_out_logps(idx: list[int], model, evals: list[dict], pad: int, dev: torch.device) -> torch.Tensor:
    """[len(idx), 1]: log pi(chosen | prompt) of held-out pairs (for dist.sharded_map)."""
    return wlt.response_logps(model, **batch_of([evals[i] for i in idx], pad, dev)).unsqueeze(-1)


def held_out_loss(model, evals: list[dict], micro: int, pad: int, dev: torch.device, dtype: str) -> float:
    """Token-mean NLL of the held-out chosen responses, without dropout."""
    model.eval()
    with torch.no_grad(), dist.autocast(dev, dtype):
        logps = dist.sharded_map(len(evals), micro, held_out_logps, model, evals, pad, dev)
    model.train()
    return float(-logps.sum() / sum(len(e["chosen_ids"]) for e in evals))


def main():
    args = parse_args()
    begun = trainer.begin(args, "sft")  # every check and the data first; only then is --out touched
    if begun is None:  # finished already
        return
    inputs, train, evals, stats = begun

    # ---- setup: the same weights on every process (sharded under torchrun), optimizer and plan
    model, tok, dev, unique_keys = models.setup_model(args)
    plan = trainer.batch_plan(len(train), args.batch_size, args.epochs, args.seed, args.max_steps)
    tokens = [len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in train]  # through the model per item, for tokens/s
    loop = trainer.Loop(args, model, plan, inputs, "sft", len(evals), tokens)
    pad = pad_id(tok)
    model.train()  # SFT keeps the model's own dropout

    # ---- loop: one optimizer step per global batch
    for step in loop.steps():
        n_tokens = sum(len(train[i]["chosen_ids"]) for i in plan[step])  # response tokens of the global batch
        sums, response_tokens = {"loss": 0.0}, 0  # summed NLL over this rank's response tokens; how many
        for idx, w in loop.micro_batches(step):  # this rank's share of the global batch
            b = batch_of([train[i] for i in idx], pad, dev)
            with dist.autocast(dev, args.dtype):
                logps = wlt.response_logps(model, **b)                                  # [B]
            wts = torch.tensor(w, device=dev)                                           # [B] 0: a padding copy
            # FSDP2 averages gradients over the W processes (its default divisor); x W turns that average back
            # into the sum over the global batch (x 1 in a single process)
            (wlt.sft_loss(logps * wts, n_tokens) * world_size()).backward()
            sums["loss"] += float(-(logps.detach() * wts).sum())
            response_tokens += sum(len(train[i]["chosen_ids"]) for i, x in zip(idx, w) if x)
        row = loop.optimizer_step(step, sums, response_tokens)  # all ranks' means; NaN stops; clip; AdamW + schedule
        if loop.eval_due(step):
            row["eval/loss"] = held_out_loss(model, evals, loop.micro, pad, dev, args.dtype)
        loop.log(row, shown=("loss", "eval/loss"))
        if loop.checkpoint_due(step):
            loop.save_checkpoint(step)  # weights, optimizer, schedule, RNG: what --resume continues from
    loop.close()

    # ---- save: the full state dict gathered to rank 0, an HF checkpoint, then train_config.json
    trainer.save_final(args, model, tok, unique_keys, loop.opt, stats, inputs)


if __name__ == "__main__":
    run_main(main)
