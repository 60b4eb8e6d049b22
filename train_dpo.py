"""Direct preference optimisation (Rafailov et al. 2023): the weak teacher pi_w on D_l (paper Eq. 4) and
the student on weakly labeled (Eq. 6) or human-labeled D_u.

    python train_dpo.py --teacher --run runs/demo
    torchrun --nproc_per_node 2 train_dpo.py --student --labels weak --run runs/demo
    python train_dpo.py --model out/sft --data pairs.jsonl --out out/dpo [--ref PATH | --reference-free]

LoRA rank 8 by default (paper); --lora-rank 0 is a full fine-tune. The reference log-probs are computed
once before the loop, with the same model (adapter disabled) or --ref, and kept in --out/ref_logps.safetensors:
the reference never runs inside the loop and needs no second model in memory. Each prompt runs once per pair,
its KV cache shared by chosen and rejected (--share-prompt), and only response positions are projected onto
the vocabulary (wlt.response_logps). Dropout is off in every forward (model.eval()), so the rewards are
deterministic. Loss = mean over the pairs of the global batch.
Output: a merged HF checkpoint in --out, the adapter in --out/adapter/ (PEFT layout), metrics.jsonl,
train_config.json, ref_logps.safetensors.
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

import wlt


def role_paths(args) -> dict:
    run = args.run
    if args.teacher:
        return {"model": os.path.join(run, "teacher", "sft"), "data": os.path.join(run, "data", "labeled.jsonl"),
                "out": os.path.join(run, "teacher", "dpo")}
    if not args.labels:
        raise wlt.WltError("--student needs --labels weak (data/weak.jsonl) or --labels human (data/unlabeled.jsonl)")
    data = {"weak": "weak.jsonl", "human": "unlabeled.jsonl"}[args.labels]
    if args.labels == "weak" and not os.path.isfile(wlt.summary_path(os.path.join(run, "data", data))):
        raise wlt.WltError(f"{run}/data/weak.jsonl is not complete (no weak.summary.json); run label.py --teacher --run {run}")
    return {"model": os.path.join(run, "student", "sft"), "data": os.path.join(run, "data", data),
            "out": os.path.join(run, "student", f"dpo-{args.labels}")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    wlt.add_train_args(ap, "dpo")
    d = ap.add_argument_group("DPO")
    d.add_argument("--labels", choices=["weak", "human"], default=None,
                   help="with --student --run: weak labels (data/weak.jsonl) or the human control (data/unlabeled.jsonl)")
    d.add_argument("--beta", type=float, default=0.1, help="KL strength beta (paper: 0.1 HH-RLHF, 0.5 TL;DR)")
    d.add_argument("--loss-type", choices=["sigmoid", "ipo", "hinge"], default="sigmoid", help="DPO, IPO or SLiC hinge")
    d.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed label-flip rate (sigmoid loss only)")
    d.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (paper: 8); 0 = full fine-tune")
    d.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (update scaled by alpha/rank)")
    d.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the LoRA input, in the training forward only (reference, held-out and saved rewards stay deterministic)")
    d.add_argument("--lora-targets", default=None, help="comma-separated module-name suffixes (default: per model family)")
    d.add_argument("--ref", default=None, help="reference model (default: the starting model itself)")
    d.add_argument("--reference-free", action="store_true", help="log pi_ref = 0 (paper appendix C, DPO without SFT)")
    d.add_argument("--share-prompt", choices=["auto", "on", "off"], default="auto",
                   help="run each prompt once and share its KV cache between chosen and rejected (auto: for the "
                        "families in wlt.SHARE_PROMPT); same numbers as off, fewer tokens through the model")
    args, run_cfg = wlt.resolve_train_args(ap, "train_dpo.py", role_paths)
    if args.lr is None:  # LoRA and full fine-tuning need very different rates
        kind = "lora" if args.lora_rank > 0 else "full"
        args.lr = run_cfg.get(f"lr_{kind}", wlt.DPO_LR[kind])
    if args.label_smoothing and args.loss_type != "sigmoid":
        ap.error("--label-smoothing applies to --loss-type sigmoid only")
    if args.share_prompt == "on" and args.activation_checkpointing:
        ap.error("--share-prompt on cannot be combined with --activation-checkpointing (a recomputed block would "
                 "write the prompt's KV cache twice)")
    inputs = wlt.begin(args)
    if inputs is None:  # --resume: finished already
        return

    # ---- setup
    targets = args.lora_targets.split(",") if args.lora_targets else None
    model, tok, dev, keep = wlt.setup_model(args, args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
    train, evals, stats = wlt.load_examples(args, tok, "dpo")
    W = wlt.world_size()
    micro = args.micro_batch_size or max(1, args.batch_size // W)
    pad = wlt.pad_id(tok)
    model.eval()  # no model dropout in DPO: policy and reference log-probs must be deterministic

    def lora_dropout(on: bool) -> None:
        """--lora-dropout acts in the training forward only; every reported reward is dropout-free."""
        for m in wlt.lora_modules(model):
            m.dropout.train(on)

    # None: wlt.pair_logps decides by the model's family. The shared prompt's KV cache is written inside each
    # block's forward: a checkpointed block would write it again when recomputed, so activation checkpointing
    # runs every sequence whole.
    share = False if args.activation_checkpointing else {"auto": None, "on": True, "off": False}[args.share_prompt]

    def pair_logps(m, exs) -> torch.Tensor:
        """[len(exs), 2]: summed response log-probs of (chosen, rejected); the prompt runs once per pair when
        shared (its KV cache serves both responses), else 2B full sequences in one forward."""
        with wlt.autocast(dev, args.dtype):
            return wlt.pair_logps(m, exs, pad, share_prompt=share)

    # ---- the reference, once, before the loop: a second model (--ref), the adapter switched off, or zeros.
    # Computed over exactly the micro-batches each rank will train on (same padding, same shapes), so while
    # pi == pi_ref (step 1) every reward is exactly 0 and the loss exactly log 2, not float noise. Kept in
    # --out/ref_logps.safetensors: a rerun with other optimisation settings (lr, beta, loss) reuses it.
    plan = wlt.batch_plan(len(train), args.batch_size, args.epochs, args.seed, args.max_steps)
    settings = wlt.checkpoint_settings(args)
    ckpt, start = wlt.checkpoint_to_resume(args.out, settings, inputs) if args.resume else (None, 0)
    ref_key = {"inputs": inputs, "micro": micro, "processes": W,
               "share_prompt": wlt.can_share_prompt(model) if share is None else share,
               **{k: getattr(args, k) for k in ("max_len", "seed", "batch_size", "epochs", "max_steps", "eval_pairs",
                                                 "dtype", "reference_free", "strict")}}
    per_epoch = -(-len(train) // args.batch_size)  # steps per epoch: plan[step] is a batch of epoch step // per_epoch
    ref_train, ref_eval = wlt.load_ref_logps(args.out, ref_key)
    if ref_train is None:
        ref_model = None
        if not args.reference_free and args.ref and os.path.abspath(args.ref) != os.path.abspath(args.model):
            ref_model = wlt.build_model(args.ref, dev, args.seed, args.trust_remote_code)[0].eval()

        def ref_logps(exs) -> torch.Tensor:
            """[len(exs), 2] log pi_ref of (chosen, rejected), on CPU."""
            if args.reference_free:
                return torch.zeros(len(exs), 2)
            with torch.no_grad(), wlt.lora_disabled(model):
                return pair_logps(ref_model or model, exs).float().cpu()

        # Before a checkpoint is loaded: a full fine-tune's reference is the starting model, not the resumed one.
        ref_train = torch.zeros(-(-len(plan) // per_epoch), len(train), 2, dtype=torch.float64)
        for step in tqdm(range(len(plan)), desc="reference log-probs", disable=wlt.rank() != 0):
            for idx, w in wlt.micro_batches(plan[step], micro):
                lp = ref_logps([train[i] for i in idx])
                for k, (i, x) in enumerate(zip(idx, w)):
                    if x:  # weight-0 padding copies are computed elsewhere
                        ref_train[step // per_epoch, i] = lp[k]
        ref_train = wlt.all_reduce_sum(ref_train).float()  # each entry comes from exactly one rank
        ref_eval = wlt.sharded_map(len(evals), micro, lambda idx: ref_logps([evals[i] for i in idx])) \
            if evals else torch.zeros(0, 2)
        wlt.save_ref_logps(args.out, ref_key, ref_train, ref_eval)
        del ref_model
    params, opt, sched = wlt.build_optimizer(model, args, len(plan))
    if ckpt:  # weights, optimizer, scheduler, RNG; the data position is the step (the plan is fixed by the seed)
        wlt.load_checkpoint(ckpt, model, opt, sched)

    def loss_fn(pol: torch.Tensor, ref: torch.Tensor):
        """pol, ref: [B, 2] (chosen, rejected) summed log-probs -> (losses, chosen_rewards, rejected_rewards)."""
        return wlt.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], args.beta, args.loss_type,
                            args.label_smoothing)

    def metrics(out, pol: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Weighted sums over pairs of loss, rewards/chosen, rewards/rejected, accuracies, margins,
        logps/chosen, logps/rejected, and the pair count: [8]. Ties count as not accurate."""
        losses, rc, rr = out
        cols = [losses.detach(), rc, rr, (rc > rr).float(), rc - rr, pol[:, 0].detach(), pol[:, 1].detach(),
                torch.ones_like(rc)]
        return torch.stack([(c.float().cpu() * w.cpu()).sum() for c in cols])

    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"]

    def averaged(sums: torch.Tensor) -> dict:
        return {k: float(sums[i] / sums[-1]) for i, k in enumerate(names)}

    def evaluate() -> dict:
        lora_dropout(False)
        with torch.no_grad():
            pol = wlt.sharded_map(len(evals), micro, lambda idx: pair_logps(model, [evals[i] for i in idx]))
        lora_dropout(True)
        return {f"eval/{k}": v for k, v in averaged(metrics(loss_fn(pol, ref_eval), pol, torch.ones(len(evals)))).items()}

    # ---- loop
    log = wlt.MetricsLog(args.out, start)
    bar = tqdm(range(start, len(plan)), initial=start, total=len(plan), desc="dpo", disable=wlt.rank() != 0)
    t0, tokens = time.time(), 0
    lora_dropout(True)
    for step in bar:
        wlt.fault_point("step", step + 1)
        batch = plan[step]
        mbs = wlt.micro_batches(batch, micro)
        sums = torch.zeros(8)
        for j, (idx, w) in enumerate(mbs):
            if W > 1:
                model.set_requires_gradient_sync(j == len(mbs) - 1)
            exs = [train[i] for i in idx]
            pol = pair_logps(model, exs)
            ref = ref_train[step // per_epoch, idx].to(dev)
            wts = torch.tensor(w, device=dev)
            out = loss_fn(pol, ref)
            # mean over the global batch's pairs; FSDP2 averages gradients over the W ranks (its default
            # divisor), so x W turns that average back into the sum (x 1 in a single process)
            ((out[0] * wts).sum() * W / len(batch)).backward()
            sums += metrics(out, pol, wts)
            tokens += sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e, x in zip(exs, w) if x)
        sums = wlt.all_reduce_sum(sums)  # every micro-batch of every rank
        loss_val = float(sums[0] / sums[-1])
        wlt.stop_if_not_finite("loss", loss_val, step + 1)  # before the update: nothing corrupt reaches the weights
        grad_norm = wlt.clip_grads(params, args.max_grad_norm)
        wlt.stop_if_not_finite("gradient norm", grad_norm, step + 1)  # a finite loss can have inf/NaN gradients
        lr_now = sched.get_last_lr()[0]  # the rate this step uses
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, **averaged(sums), "lr": lr_now, "grad_norm": grad_norm}
        row["tokens/s"] = float(wlt.all_reduce_sum(torch.tensor([float(tokens)]))[0]) / max(1e-9, time.time() - t0)
        if evals and ((step + 1) % args.eval_every == 0 or step + 1 == len(plan)):
            row.update(evaluate())
        log.write(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(plan):
            wlt.save_checkpoint(args.out, model, opt, sched, step + 1, settings, inputs)
    log.close()

    # ---- save: merged HF checkpoint + adapter/ (PEFT layout), gathered to rank 0
    stats["memory"] = wlt.memory_report(model, opt)  # per-rank shards: 1/N of one process's under FSDP2
    sd = wlt.full_state_dict(model)
    if wlt.rank() == 0:
        if args.lora_rank > 0:
            merged, adapter = wlt.split_lora_state_dict(sd, model.wlt_lora)
            wlt.save_hf_checkpoint(args.out, merged, model, tok, keep)
            wlt.save_adapter(args.out, adapter, model.wlt_lora, os.path.abspath(args.model))
        else:
            wlt.save_hf_checkpoint(args.out, sd, model, tok, keep)
        wlt.log(f"saved {args.out}")
    wlt.finish(args, stats, inputs)


if __name__ == "__main__":
    wlt.run_main(main)
