"""Supervised fine-tuning on the chosen responses: the reference policy pi_ref of the paper (step 1 for the
teacher, step 4 for the student). Full fine-tune, loss on response tokens only.

    python train_sft.py --teacher --run runs/demo
    torchrun --nproc_per_node 2 train_sft.py --student --run runs/demo
    python train_sft.py --model facebook/opt-125m --data pairs.jsonl --out out/sft

Loss: summed NLL of the chosen-response tokens over the global batch / number of those tokens, so any
number of processes and micro-batches gives the same step as one process on the whole batch.
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

import wlt


def role_paths(args) -> dict:
    run = args.run
    who = "teacher" if args.teacher else "student"
    return {"data": os.path.join(run, "data", "labeled.jsonl"), "out": os.path.join(run, who, "sft")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    wlt.add_train_args(ap, "sft")
    args, _ = wlt.resolve_train_args(ap, "train_sft.py", role_paths)
    args.lr = args.lr if args.lr is not None else wlt.SFT_LR
    inputs = wlt.begin(args)
    if inputs is None:  # --resume: finished already
        return

    # ---- setup: model on every rank, data, optimizer
    model, tok, dev, keep = wlt.setup_model(args)
    train, evals, stats = wlt.load_examples(args, tok, "sft")
    W = wlt.world_size()
    micro = args.micro_batch_size or max(1, args.batch_size // W)
    plan = wlt.batch_plan(len(train), args.batch_size, args.epochs, args.seed, args.max_steps)
    params, opt, sched = wlt.build_optimizer(model, args, len(plan))
    settings = wlt.checkpoint_settings(args)
    ckpt, start = wlt.checkpoint_to_resume(args.out, settings, inputs) if args.resume else (None, 0)
    if ckpt:  # weights, optimizer, scheduler, RNG; the data position is the step (the plan is fixed by the seed)
        wlt.load_checkpoint(ckpt, model, opt, sched)
    pad = wlt.pad_id(tok)

    def batch_of(exs):
        return {k: v.to(dev) for k, v in wlt.collate([(e["prompt_ids"], e["chosen_ids"]) for e in exs], pad).items()}

    def eval_nll() -> float:
        """Token-mean NLL of the held-out chosen responses."""
        with torch.no_grad(), wlt.autocast(dev, args.dtype):
            logps = wlt.sharded_map(len(evals), micro, lambda idx: wlt.response_logps(
                model, **batch_of([evals[i] for i in idx])).unsqueeze(-1))
        return float(-logps.sum() / sum(len(e["chosen_ids"]) for e in evals))

    # ---- loop
    log = wlt.MetricsLog(args.out, start)
    model.train()  # SFT keeps the model's own dropout
    bar = tqdm(range(start, len(plan)), initial=start, total=len(plan), desc="sft", disable=wlt.rank() != 0)
    t0, seen_tokens = time.time(), 0
    for step in bar:
        wlt.fault_point("step", step + 1)
        batch = plan[step]
        n_tokens = sum(len(train[i]["chosen_ids"]) for i in batch)  # response tokens of the global batch
        mbs = wlt.micro_batches(batch, micro)
        nll_sum = 0.0  # summed NLL of this rank's share, for logging
        for j, (idx, w) in enumerate(mbs):
            if W > 1:
                model.set_requires_gradient_sync(j == len(mbs) - 1)  # reduce-scatter once per step
            b = batch_of([train[i] for i in idx])
            with wlt.autocast(dev, args.dtype):
                logps = wlt.response_logps(model, **b)
            wts = torch.tensor(w, device=dev)
            # FSDP2 averages gradients over the W ranks (its default divisor); x W turns that average back
            # into the sum over the global batch (x 1 in a single process)
            loss = wlt.sft_loss(logps * wts, n_tokens) * W
            loss.backward()
            nll_sum += float(-(logps.detach() * wts).sum())
            seen_tokens += int((b["attention_mask"].sum(-1) * (wts > 0)).sum())  # real tokens, all positions
        totals = wlt.all_reduce_sum(torch.tensor([nll_sum, float(seen_tokens)]))
        loss_val = float(totals[0]) / n_tokens
        wlt.stop_if_not_finite("loss", loss_val, step + 1)  # before the update: nothing corrupt reaches the weights
        grad_norm = wlt.clip_grads(params, args.max_grad_norm)
        wlt.stop_if_not_finite("gradient norm", grad_norm, step + 1)  # a finite loss can have inf/NaN gradients
        lr_now = sched.get_last_lr()[0]  # the rate this step uses
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": loss_val, "lr": lr_now, "grad_norm": grad_norm,
               "tokens/s": float(totals[1]) / max(1e-9, time.time() - t0)}
        if evals and ((step + 1) % args.eval_every == 0 or step + 1 == len(plan)):
            model.eval()
            row["eval/loss"] = eval_nll()
            model.train()
        log.write(row)
        bar.set_postfix(loss=f"{loss_val:.4f}", **({"eval": f"{row['eval/loss']:.4f}"} if "eval/loss" in row else {}))
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(plan):
            wlt.save_checkpoint(args.out, model, opt, sched, step + 1, settings, inputs)
    log.close()

    # ---- save: full state dict gathered to rank 0 (a collective under FSDP2)
    stats["memory"] = wlt.memory_report(model, opt)  # per-rank shards: 1/N of one process's under FSDP2
    sd = wlt.full_state_dict(model)
    if wlt.rank() == 0:
        wlt.save_hf_checkpoint(args.out, sd, model, tok, keep)
        wlt.log(f"saved {args.out}")
    wlt.finish(args, stats, inputs)


if __name__ == "__main__":
    wlt.run_main(main)
