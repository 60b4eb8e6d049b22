"""Supervised fine-tuning on the chosen responses: the reference policy pi_ref of the paper, for the weak
teacher (on D_l) and for the student. A full fine-tune; the loss is on the response tokens only.

    torchrun train_sft.py --teacher                           in the default run folder, runs/synthetic
    torchrun --nproc_per_node 2 train_sft.py --student --run-dir runs/demo
    python train_sft.py --model facebook/opt-125m --data pairs.jsonl --out out/sft

Loss (wlt.sft_loss): the summed NLL of the chosen-response tokens of the global batch over the number of those
tokens, so that any number of processes and micro-batches takes the step one process takes on the whole batch.
The sequences of a micro-batch are packed into rows without padding between them (--pack; wlt.pair_logps with
one response a pair). Model dropout stays on. Output in --out: an HF checkpoint, metrics.jsonl,
train_config.json (written last).
"""
import argparse
import time

import torch

import wlt
from lib import checkpoint, dist, models, outputs, trainer
from lib.console import progress
from lib.data import pad_id
from lib.defaults import SFT_LR
from lib.signals import Interrupted, SaveNotice, run_main


# What each role reads and writes: (model, data, out) in the run folder (--run-dir); the model it starts from is
# the run's base model of that role (config.json).
ROLES = {"teacher": (None, "data/labeled.jsonl", "teacher/sft"), "student": (None, "data/labeled.jsonl", "student/sft")}


CHOSEN = ("chosen_ids",)  # SFT scores one response of each pair: the chosen one


def build_parser() -> argparse.ArgumentParser:
    ap = trainer.argument_parser_for(__doc__, "sft")
    ap.add_argument_group("SFT").add_argument(
        "--pack", choices=["auto", "on", "off"], default="auto",
        help="lay a micro-batch's sequences out in rows as long as its longest, several short ones to a row, each "
             "seeing only itself, instead of one padded row each (auto: for the families in wlt.PACK_FAMILIES); the "
             "same numbers as off up to fp32 rounding, fewer tokens through the model")
    return ap


def parse_args() -> argparse.Namespace:
    ap = build_parser()
    args, _ = trainer.parse_args(ap, "train_sft.py", ROLES)
    if args.lr is None:
        args.lr = SFT_LR
    return args


def held_out_logps(idx: list[int], evals: list[dict], model, pad: int, pack: bool) -> torch.Tensor:
    """[len(idx), 1]: log pi(chosen | prompt) of held-out pairs (for dist.sharded_map)."""
    return dist.in_forward(model, wlt.pair_logps, [evals[i] for i in idx], pad, pack, responses=CHOSEN)


def held_out_loss(model, evals: list[dict], pad: int, pack: bool, args) -> float:
    """Token-mean NLL of the held-out chosen responses, without dropout."""
    model.eval()
    with torch.no_grad(), dist.autocast(dist.device(), args.dtype):
        logps = dist.sharded_map(len(evals), trainer.micro_batch_size(args), held_out_logps, evals, model, pad, pack)
    model.train()
    return float(-logps.sum() / sum(len(e["chosen_ids"]) for e in evals))


def main():
    args = parse_args()
    dist.init_distributed(args.dist_timeout)  # every process, before rank 0 takes the lock for them
    with outputs.locked(args.out):  # this run alone writes --out, to its end: a second run on it is refused
        run(args)


def run(args):
    """The run: every check and the data, the model, the loop, the final save."""
    begun = trainer.begin(args, "sft")  # every check and the data first; only then is --out touched
    if begun is None:  # finished already
        return
    inputs, tok, train, evals, stats = begun

    # ---- setup: the same weights on every process (sharded under torchrun), the optimizer and the plan
    model, unique_keys = models.setup_model(args)
    pack = models.pack_setting(args.pack, model, "--pack")
    dev, pad, W, micro = dist.device(), pad_id(tok), dist.world_size(), trainer.micro_batch_size(args)
    models.warn_plain_path(model, micro, args.max_len)
    plan = trainer.batch_plan(len(train), args.batch_size, args.epochs, args.seed, args.max_steps)
    params, opt, sched = trainer.build_optimizer(model, args, len(plan))  # AdamW; warmup, then cosine
    settings = trainer.checkpoint_settings(args)
    start = checkpoint.resume(args.out, model, opt, sched, settings, inputs) if args.resume else 0
    model.train()  # SFT keeps the model's own dropout

    # ---- the loop: one optimizer step per global batch of sequences
    t0, tokens = time.time(), 0  # tokens through the model, for tokens/s
    with (trainer.MetricsLog(args, start) as metrics, progress(len(plan), "sft", "step", initial=start) as bar,
          SaveNotice() as notice):  # SIGTERM/SIGUSR1 are only recorded: the loop saves at the step's end, then stops
        for step in range(start, len(plan)):
            n_tokens = sum(len(train[i]["chosen_ids"]) for i in plan[step])  # response tokens of the global batch
            nll, counted = 0.0, 0  # summed NLL over this rank's response tokens, and how many tokens that is
            micro_batches = dist.micro_batches(plan[step], micro)  # this rank's share: [(indices, weights)]
            for j, (idx, w) in enumerate(micro_batches):
                # FSDP2 reduce-scatters the gradients once per step, after the last micro-batch
                if W > 1:
                    model.set_requires_gradient_sync(j == len(micro_batches) - 1)
                with dist.autocast(dev, args.dtype):  # bf16 on CUDA, fp32 on the CPU
                    logps = dist.in_forward(model, wlt.pair_logps, [train[i] for i in idx], pad, pack,
                                            responses=CHOSEN)[:, 0]                     # [B] log pi(y|x), Eq. 2
                weight = torch.tensor(w, device=dev)                                    # [B] 1, or 0: a padding copy
                # the token mean over the global batch; FSDP2 averages gradients over the W ranks, so x W turns
                # that average into the sum over all ranks' tokens (x 1 in one process)
                loss = wlt.sft_loss(logps * weight, n_tokens) * W
                loss.backward()
                nll += float(-(logps.detach() * weight).sum())
                counted += sum(len(train[i]["chosen_ids"]) for i, x in zip(idx, w) if x)
                tokens += sum(len(train[i]["prompt_ids"]) + len(train[i]["chosen_ids"]) for i, x in zip(idx, w) if x)

            # ---- the update: the loss over every rank's tokens, then clip, AdamW and the schedule
            totals = dist.all_reduce_sum(torch.tensor([nll, counted, tokens], dtype=torch.float64))
            row = {"step": step + 1, "loss": float(totals[0] / totals[1])}
            trainer.stop_if_not_finite("loss", row["loss"], step + 1)  # before the update: the weights stay sound
            grad_norm = trainer.clip_grads(params, args.max_grad_norm)   # the global norm, before clipping
            trainer.stop_if_not_finite("gradient norm", grad_norm, step + 1)
            row.update({"lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                        "tokens/s": float(totals[2]) / max(1e-9, time.time() - t0)})
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

            if evals and ((step + 1) % args.eval_every == 0 or step + 1 == len(plan)):
                row["eval/loss"] = held_out_loss(model, evals, pad, pack, args)
            metrics.write(row)

            # ---- a mid-run checkpoint every --save-every steps, and now if any rank got a stop signal
            stop = int(dist.all_reduce_max(torch.tensor([notice.came])))  # a collective, every step
            if stop or (args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(plan)):
                checkpoint.save_checkpoint(args.out, model, opt, sched, step + 1, settings, inputs)
            bar.update(1)
            bar.set_postfix(**{k.replace("/", "_"): f"{row[k]:.4f}" for k in ("loss", "eval/loss") if k in row})
            if stop:
                raise Interrupted(stop, saved=f"a checkpoint of step {step + 1} in {args.out}")

    # ---- save: the full state dict gathered to rank 0, an HF checkpoint, then train_config.json
    trainer.save_final(args, model, tok, unique_keys, opt, stats, inputs)


if __name__ == "__main__":
    run_main(main)
