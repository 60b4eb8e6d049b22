"""Direct preference optimisation (wlt.py, Eq. 3): the weak teacher pi_w on D_l (Eq. 4), and the student on
weakly labeled D_u (Eq. 6) or, as the control, on D_u's human labels.

    torchrun train_dpo.py --teacher                           in the default run folder, runs/synthetic
    torchrun --nproc_per_node 2 train_dpo.py --student --labels weak --run-dir runs/demo
    python train_dpo.py --model out/sft --data pairs.jsonl --out out/dpo [--ref PATH | --reference-free]

LoRA rank 8 by default (the paper's); --lora-rank 0 is a full fine-tune. The reference log-probs are computed
once, before the loop, with the same model (adapter off) or --ref, and kept in --out/ref_logps.safetensors: the
reference never runs inside the loop and needs no second model in memory. Dropout is off in every forward of
the model (model.eval()); --lora-dropout acts in the training forward only. Loss = the mean over the pairs of
the global batch. Output in --out: a merged HF checkpoint, the adapter in adapter/ (PEFT layout),
metrics.jsonl, train_config.json (written last), ref_logps.safetensors.
"""
import argparse
import gc
import os
import time

import torch

import wlt
from lib import checkpoint, dist, models, outputs, trainer
from lib.console import check_ranges, progress
from lib.data import pad_id
from lib.defaults import DPO_LR
from lib.signals import Interrupted, SaveNotice, run_main


# Eq. 4 and Eq. 6 are one loss (Eq. 3) on different pairs. What tells them apart is what each role starts from,
# which pairs it reads and where it writes: (model, data, out) in the run folder (--run-dir).
ROLES = {
    "teacher": ("teacher/sft", "data/labeled.jsonl", "teacher/dpo"),                 # Eq. 4: D_l, human labels
    "student --labels weak": ("student/sft", "data/weak.jsonl", "student/dpo-weak"),  # Eq. 6: D_u, weak labels
    "student --labels human": ("student/sft", "data/unlabeled.jsonl", "student/dpo-human"),  # the control: D_u,
}                                                                                             # its human labels


def build_parser() -> argparse.ArgumentParser:
    ap = trainer.argument_parser_for(__doc__, "dpo")
    d = ap.add_argument_group("DPO")
    d.add_argument("--labels", choices=["weak", "human"], default=None,
                   help="with --student: the teacher's labels (data/weak.jsonl) or the human control (data/unlabeled.jsonl)")
    d.add_argument("--beta", type=float, default=0.1, help="KL strength beta (paper: 0.1 HH-RLHF, 0.5 TL;DR)")
    d.add_argument("--loss-type", choices=["sigmoid", "ipo", "ipo-mean", "hinge"], default="sigmoid",
                   help="sigmoid = DPO; ipo = IPO on summed log-probs, as Azar et al. write it; ipo-mean = IPO on "
                        "per-token mean log-probs, as TRL computes its loss (the logged rewards are then per-token means "
                        "too); "
                        "hinge = SLiC (wlt.dpo_loss)")
    d.add_argument("--label-smoothing", type=float, default=0.0,
                   help="conservative DPO: the assumed label-flip rate (sigmoid loss only)")
    d.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (paper: 8); 0 = full fine-tune")
    d.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (update scaled by alpha/rank)")
    d.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the LoRA input, in the training forward only: the training rows' loss, "
                        "rewards/* and logps/* then carry dropout noise; the reference log-probs, the eval/* rows "
                        "and label.py's rewards stay deterministic")
    d.add_argument("--lora-targets", default=None,
                   help="comma-separated module-name suffixes (default: per model family, wlt.LORA_TARGETS)")
    d.add_argument("--ref", default=None, help="reference model (default: the starting model itself)")
    d.add_argument("--reference-free", action="store_true", help="log pi_ref = 0 (paper appendix C, DPO without SFT)")
    d.add_argument("--share-prompt", choices=["auto", "on", "off"], default="auto",
                   help="run each prompt once for both responses (auto: for the families in wlt.PACK_FAMILIES); the "
                        "same numbers as off up to fp32 rounding, fewer tokens through the model")
    return ap


def parse_args() -> argparse.Namespace:
    ap = build_parser()
    args, run_cfg = trainer.parse_args(ap, "train_dpo.py", ROLES)
    if args.lr is None:  # LoRA and full fine-tuning need very different rates
        kind = "lora" if args.lora_rank > 0 else "full"
        args.lr = run_cfg.get(f"lr_{kind}", DPO_LR[kind])
    check_ranges(ap, args, beta="> 0", label_smoothing="in [0, 0.5)", lora_rank=">= 0", lora_alpha="> 0",
                 lora_dropout="in [0, 1)")
    if args.label_smoothing and args.loss_type != "sigmoid":
        ap.error("--label-smoothing applies to --loss-type sigmoid only")
    return args


# ----------------------------------------------------------------------------------------------------------
# the pieces of a step


def logps_of(idx: list[int], pairs: list[dict], model, pad: int, share: bool, dtype: str) -> torch.Tensor:
    """[len(idx), 2]: log pi(chosen | x), log pi(rejected | x) of pairs[idx] (wlt.pair_logps, Eq. 2), in --dtype."""
    with dist.autocast(dist.device(), dtype):
        return dist.in_forward(model, wlt.pair_logps, [pairs[i] for i in idx], pad, share)


def response_lengths(idx: list[int], pairs: list[dict], dev: torch.device) -> torch.Tensor:
    """[len(idx), 2]: tokens of (chosen, rejected) response, EOS included: what a log-prob sums over."""
    return torch.tensor([[len(pairs[i]["chosen_ids"]), len(pairs[i]["rejected_ids"])] for i in idx], device=dev)


def preference_loss(pol: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor, args):
    """Eq. 3 on [B, 2] (chosen, rejected) log-probs of the policy and the reference -> wlt.dpo_loss's (losses,
    chosen_rewards, rejected_rewards), [B] each. --loss-type ipo-mean is IPO on per-token means (lengths [B, 2])."""
    loss_type = args.loss_type
    if loss_type == "ipo-mean":
        pol, ref, loss_type = wlt.per_token_mean(pol, lengths), wlt.per_token_mean(ref, lengths), "ipo"
    return wlt.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], args.beta, loss_type, args.label_smoothing)


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")  # TRL's names


def metric_sums(losses, chosen_rewards, rejected_rewards, pol: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """METRICS as sums over the pairs, each pair weighted by weight [B] (0: a padding copy) -> [len(METRICS)]
    float64 on the CPU. Ties count as not accurate."""
    cols = [losses.detach(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
            chosen_rewards - rejected_rewards, pol[:, 0].detach(), pol[:, 1].detach()]
    return (torch.stack([c.float() for c in cols]) * weight).sum(-1).double().cpu()  # one device-to-host copy


def set_lora_dropout(model, on: bool) -> None:
    """--lora-dropout acts in the training forward only: the reference and held-out rewards are dropout-free."""
    for m in wlt.lora_modules(model):
        m.dropout.train(on)


def held_out_metrics(model, evals: list[dict], ref_eval: torch.Tensor, pad: int, share: bool, args) -> dict:
    """eval/<metric>: METRICS' means over the held-out pairs, without dropout."""
    set_lora_dropout(model, False)
    with torch.no_grad():
        pol = dist.sharded_map(len(evals), trainer.micro_batch_size(args), logps_of, evals, model, pad, share,
                               args.dtype)
    set_lora_dropout(model, True)
    lengths = response_lengths(range(len(evals)), evals, pol.device)
    losses, chosen_rewards, rejected_rewards = preference_loss(pol, ref_eval, lengths, args)
    sums = metric_sums(losses, chosen_rewards, rejected_rewards, pol, torch.ones(len(evals)))
    return {f"eval/{k}": float(v) / len(evals) for k, v in zip(METRICS, sums)}


# ----------------------------------------------------------------------------------------------------------
# the reference log-probs, computed once before the loop

# Flags that change how the policy is trained or saved, not log pi_ref: a rerun that changes only these reuses the
# cached reference. Every other flag is part of its key, so a flag added later can only cause a recomputation.
NOT_IN_REFERENCE = ("lr", "beta", "loss_type", "label_smoothing", "lora_alpha", "lora_dropout", "warmup_ratio",
                    "weight_decay", "max_grad_norm", "eval_every", "save_every", "save_dtype", "max_shard_size",
                    "report_to", "resume", "overwrite", "share_prompt", "dtype", "dist_timeout")


def reference_key(args, inputs: dict, share: bool, dev: torch.device) -> dict:
    """What the cached reference log-probs depend on: every flag outside NOT_IN_REFERENCE, the inputs, and how the
    run was resolved (the compute dtype and device type, not the --dtype flag: `auto` is fp32 on a CPU and bf16 on
    CUDA; the processes and micro-batches, which lay out the rows; prompt sharing; the torch release)."""
    return {**{k: v for k, v in vars(args).items() if k not in NOT_IN_REFERENCE}, "inputs": inputs,
            "share_prompt": share, "compute_dtype": str(dist.compute_dtype(dev, args.dtype)), "device": dev.type,
            "processes": dist.world_size(), "micro": trainer.micro_batch_size(args), "torch": torch.__version__}


def reference_logps(args, model, train: list[dict], evals: list[dict], plan: list[list[int]], pad: int, share: bool,
                    inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref of every training pair per epoch, [epochs, N_train, 2] (chosen, rejected), and of the held-out
    pairs, [N_eval, 2]: the model with its adapter off (or --ref, or zeros with --reference-free), before a
    checkpoint is loaded (a full fine-tune's reference is the starting model). Computed over exactly the
    micro-batches each process will train on, so that at step 1, where pi == pi_ref, every reward is exactly 0
    and the loss exactly log 2, not float noise. Kept in --out/ref_logps.safetensors under reference_key."""
    per_epoch = trainer.steps_per_epoch(len(train), args.batch_size)  # plan[step] is in epoch step // per_epoch
    epochs, micro = -(-len(plan) // per_epoch), trainer.micro_batch_size(args)
    if args.reference_free:
        return torch.zeros(epochs, len(train), 2), torch.zeros(len(evals), 2)
    dev = dist.device()
    key = reference_key(args, inputs, share, dev)
    cached = checkpoint.load_ref_logps(args.out, key)
    if cached is not None:
        return cached
    ref_model = model  # with its adapter off (wlt.lora_disabled), or unchanged before a full fine-tune's step 1
    if args.ref and os.path.abspath(args.ref) != os.path.abspath(args.model):
        ref_model = models.build_model(args.ref, dev, args.seed, args.trust_remote_code, dtype=args.dtype)[0].eval()
    ref_train = torch.zeros(epochs, len(train), 2, dtype=torch.float64)
    with torch.no_grad(), wlt.lora_disabled(model), progress(len(plan), "reference log-probs", "step") as bar:
        for step in range(len(plan)):
            for idx, w in dist.micro_batches(plan[step], micro):
                lp = logps_of(idx, train, ref_model, pad, share, args.dtype).cpu()
                for k, i in enumerate(idx):
                    if w[k]:  # weight-0 padding copies are computed on another rank
                        ref_train[step // per_epoch, i] = lp[k]
            bar.update(1)
        ref_train = dist.all_reduce_sum(ref_train).float()  # each entry comes from exactly one rank
        ref_eval = (dist.sharded_map(len(evals), micro, logps_of, evals, ref_model, pad, share, args.dtype) if evals
                    else torch.zeros(0, 2))
    del ref_model
    gc.collect()  # a sharded --ref model is in a reference cycle (FSDP's registered forward): free it now
    checkpoint.save_ref_logps(args.out, key, ref_train, ref_eval)
    return ref_train, ref_eval


# ----------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    dist.init_distributed(args.dist_timeout)  # every process, before rank 0 takes the lock for them
    with outputs.locked(args.out):  # this run alone writes --out, to its end: a second run on it is refused
        run(args)


def run(args):
    """The run: every check and the data, the model, the loop, the final save."""
    begun = trainer.begin(args, "dpo")  # every check and the data first; only then is --out touched
    if begun is None:  # finished already
        return
    inputs, tok, train, evals, stats = begun

    # ---- setup: the policy (LoRA on the starting model, sharded under torchrun), the reference, the optimizer
    lora = None
    if args.lora_rank > 0:
        lora = dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    targets=args.lora_targets.split(",") if args.lora_targets else None)
    model, unique_keys = models.setup_model(args, lora)
    model.eval()  # no model dropout in DPO: policy and reference log-probs must be deterministic
    share = models.pack_setting(args.share_prompt, model)
    dev, pad, W, micro = dist.device(), pad_id(tok), dist.world_size(), trainer.micro_batch_size(args)
    models.warn_plain_path(model, 2 * micro, args.max_len)
    plan = trainer.batch_plan(len(train), args.batch_size, args.epochs, args.seed, args.max_steps)
    per_epoch = trainer.steps_per_epoch(len(train), args.batch_size)
    ref_train, ref_eval = reference_logps(args, model, train, evals, plan, pad, share, inputs)  # log pi_ref
    params, opt, sched = trainer.build_optimizer(model, args, len(plan))  # AdamW; warmup, then cosine
    settings = trainer.checkpoint_settings(args)
    start = checkpoint.resume(args.out, model, opt, sched, settings, inputs) if args.resume else 0
    set_lora_dropout(model, True)

    # ---- the loop: one optimizer step per global batch of pairs
    t0, tokens = time.time(), 0  # tokens through the model (the prompt counted with each response), for tokens/s
    with (trainer.MetricsLog(args, start) as metrics, progress(len(plan), "dpo", "step", initial=start) as bar,
          SaveNotice() as notice):  # SIGTERM/SIGUSR1 are only recorded: the loop saves at the step's end, then stops
        for step in range(start, len(plan)):
            sums = torch.zeros(len(METRICS), dtype=torch.float64)  # METRICS summed over this rank's pairs
            pairs = 0                                               # ... and how many pairs that is
            micro_batches = dist.micro_batches(plan[step], micro)  # this rank's share: [(pair indices, weights)]
            for j, (idx, w) in enumerate(micro_batches):
                # FSDP2 reduce-scatters the gradients once per step, after the last micro-batch
                if W > 1:
                    model.set_requires_gradient_sync(j == len(micro_batches) - 1)
                with dist.autocast(dev, args.dtype):  # bf16 on CUDA, fp32 on the CPU
                    pol = dist.in_forward(model, wlt.pair_logps, [train[i] for i in idx], pad, share)  # [B, 2] log pi
                ref = ref_train[step // per_epoch, idx].to(dev)                     # [B, 2] log pi_ref, cached
                losses, chosen_rewards, rejected_rewards = preference_loss(pol, ref, response_lengths(idx, train, dev),
                                                                           args)     # [B] each, Eq. 3
                weight = torch.tensor(w, device=dev)                                # [B] 1, or 0: a padding copy
                # the mean over the global batch's pairs; FSDP2 averages gradients over the W ranks, so x W
                # turns that average into the sum over all ranks' pairs (x 1 in one process)
                loss = (losses * weight).sum() / len(plan[step]) * W
                loss.backward()
                sums += metric_sums(losses, chosen_rewards, rejected_rewards, pol, weight)
                pairs += sum(w)
                tokens += sum(2 * len(train[i]["prompt_ids"]) + len(train[i]["chosen_ids"]) +
                              len(train[i]["rejected_ids"]) for i, x in zip(idx, w) if x)

            # ---- the update: the metrics' means over every rank's pairs, then clip, AdamW and the schedule
            totals = dist.all_reduce_sum(torch.cat([sums, torch.tensor([pairs, tokens], dtype=torch.float64)]))
            row = {"step": step + 1, **{k: float(v / totals[-2]) for k, v in zip(METRICS, totals)}}
            trainer.stop_if_not_finite("loss", row["loss"], step + 1)  # before the update: the weights stay sound
            grad_norm = trainer.clip_grads(params, args.max_grad_norm)   # the global norm, before clipping
            trainer.stop_if_not_finite("gradient norm", grad_norm, step + 1)
            row.update({"lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                        "tokens/s": float(totals[-1]) / max(1e-9, time.time() - t0)})
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

            if evals and ((step + 1) % args.eval_every == 0 or step + 1 == len(plan)):
                row.update(held_out_metrics(model, evals, ref_eval, pad, share, args))
            metrics.write(row)

            # ---- a mid-run checkpoint every --save-every steps, and now if any rank got a stop signal
            stop = int(dist.all_reduce_max(torch.tensor([notice.came])))  # a collective, every step
            if stop or (args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(plan)):
                checkpoint.save_checkpoint(args.out, model, opt, sched, step + 1, settings, inputs)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", accuracies=f"{row['rewards/accuracies']:.4f}")
            if stop:
                raise Interrupted(stop, saved=f"a checkpoint of step {step + 1} in {args.out}")

    # ---- save: the merged HF checkpoint and adapter/ (PEFT layout), gathered to rank 0, then train_config.json
    trainer.save_final(args, model, tok, unique_keys, opt, stats, inputs)


if __name__ == "__main__":
    run_main(main)
