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
import dataclasses
import os

import torch

import wlt
from lib import checkpoint, dist, models, trainer
from lib.console import check_ranges, progress, run_main, world_size
from lib.data import pad_id
from lib.defaults import DPO_LR


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
                   help="run each prompt once for both responses (auto: for the families in wlt.SHARE_PROMPT); the "
                        "same numbers as off up to fp32 rounding, fewer tokens through the model")
    return ap


def parse_args() -> argparse.Namespace:
    ap = build_parser()
    args, run_cfg = trainer.parse_args(ap, "train_dpo.py")
    if args.lr is None:  # LoRA and full fine-tuning need very different rates
        kind = "lora" if args.lora_rank > 0 else "full"
        args.lr = run_cfg.get(f"lr_{kind}", DPO_LR[kind])
    check_ranges(ap, args, beta="> 0", label_smoothing="in [0, 0.5)", lora_rank=">= 0", lora_alpha="> 0",
                 lora_dropout="in [0, 1)")
    if args.label_smoothing and args.loss_type != "sigmoid":
        ap.error("--label-smoothing applies to --loss-type sigmoid only")
    return args


@dataclasses.dataclass(frozen=True)
class Forward:
    """How pairs go through a model, resolved once in main: the padding id, whether a pair's prompt runs once for
    both responses (models.share_prompt_setting), the device, and --dtype (bf16 autocast on CUDA)."""
    pad: int
    share: bool
    dev: torch.device
    dtype: str


@dataclasses.dataclass(frozen=True)
class Objective:
    """Eq. 3's loss and its settings, resolved once in main."""
    beta: float
    loss_type: str        # sigmoid | ipo | ipo-mean | hinge
    label_smoothing: float

    def __call__(self, pol: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
        """pol, ref, lengths: [B, 2] (chosen, rejected) -> wlt.dpo_loss's (losses, chosen_rewards,
        rejected_rewards), [B] each. ipo-mean is IPO on per-token means (wlt.per_token_mean) of the policy's and
        the reference's log-probs."""
        loss_type = self.loss_type
        if loss_type == "ipo-mean":
            pol, ref, loss_type = wlt.per_token_mean(pol, lengths), wlt.per_token_mean(ref, lengths), "ipo"
        return wlt.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.beta, loss_type, self.label_smoothing)


def policy_logps(idx: list[int], items: list[dict], model, fwd: Forward) -> torch.Tensor:
    """[len(idx), 2]: log pi(chosen | x), log pi(rejected | x) of items[idx] (wlt.pair_logps, Eq. 2)."""
    with dist.autocast(fwd.dev, fwd.dtype):
        return wlt.pair_logps(model, [items[i] for i in idx], fwd.pad, share_prompt=fwd.share)


def reference_logps_of(idx: list[int], items: list[dict], model, ref_model, fwd: Forward,
                       reference_free: bool) -> torch.Tensor:
    """[len(idx), 2] on CPU: log pi_ref of (chosen, rejected): a second model (--ref), the policy with its
    adapter switched off, or zeros (--reference-free)."""
    if reference_free:
        return torch.zeros(len(idx), 2)
    with torch.no_grad(), wlt.lora_disabled(model):
        return policy_logps(idx, items, ref_model or model, fwd).float().cpu()


def reference_key(args, share: bool, packed: bool, inputs: dict, micro: int) -> dict:
    """What the cached reference log-probs depend on: the inputs, the data settings, and how the pairs are cut
    into micro-batches and processes, and how pairs are laid out (padding, prompt sharing and packing change the
    last bits; a cache without the packed key predates rows shared by several pairs)."""
    return {"inputs": inputs, "micro": micro, "processes": world_size(), "share_prompt": share, "packed": packed,
            **{k: getattr(args, k) for k in ("max_len", "seed", "batch_size", "epochs", "max_steps", "eval_pairs",
                                              "dtype", "reference_free", "strict")}}


def reference_logps(args, model, train: list[dict], evals: list[dict], plan: list[list[int]], fwd: Forward,
                    inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref of every training pair, per epoch [epochs, N_train, 2], and of the held-out pairs [N_eval, 2].
    Computed once before the loop, over exactly the micro-batches each process will train on (same padding,
    same shapes), so that while pi == pi_ref (step 1) every reward is exactly 0 and the loss exactly log 2, not
    float noise; before a checkpoint is loaded, since a full fine-tune's reference is the starting model. Kept
    in --out/ref_logps.safetensors: a rerun with other optimisation settings (lr, beta, loss) reuses it."""
    micro = trainer.micro_batch_size(args)
    key = reference_key(args, fwd.share, fwd.share and wlt.can_pack(model), inputs, micro)
    ref_train, ref_eval = checkpoint.load_ref_logps(args.out, key)
    if ref_train is not None:
        return ref_train, ref_eval
    ref_model = None
    if not args.reference_free and args.ref and os.path.abspath(args.ref) != os.path.abspath(args.model):
        ref_model = models.build_model(args.ref, fwd.dev, args.seed, args.trust_remote_code, dtype=args.dtype)[0].eval()
    per_epoch = trainer.steps_per_epoch(len(train), args.batch_size)  # plan[step] is a batch of epoch step // per_epoch
    ref_train = torch.zeros(-(-len(plan) // per_epoch), len(train), 2, dtype=torch.float64)
    bar = progress(len(plan), "reference log-probs", "step")
    for step in range(len(plan)):
        for idx, w in dist.micro_batches(plan[step], micro):
            lp = reference_logps_of(idx, train, model, ref_model, fwd, args.reference_free)
            for k, (i, x) in enumerate(zip(idx, w)):
                if x:  # weight-0 padding copies are computed elsewhere
                    ref_train[step // per_epoch, i] = lp[k]
        bar.update(1)
    bar.close()
    ref_train = dist.all_reduce_sum(ref_train).float()  # each entry comes from exactly one process
    ref_eval = dist.sharded_map(len(evals), micro, reference_logps_of, evals, model, ref_model, fwd,
                                args.reference_free) if evals else torch.zeros(0, 2)
    checkpoint.save_ref_logps(args.out, key, ref_train, ref_eval)
    return ref_train, ref_eval


def response_lengths(idx: list[int], items: list[dict], dev: torch.device) -> torch.Tensor:
    """[len(idx), 2]: tokens of (chosen, rejected) response, EOS included: what response_logps sums over."""
    return torch.tensor([[len(items[i]["chosen_ids"]), len(items[i]["rejected_ids"])] for i in idx], device=dev)


def pair_metrics(losses, chosen_rewards, rejected_rewards, pol: torch.Tensor, w: torch.Tensor) -> dict:
    """The named metrics as sums over the pairs, weighted by w [B]. Ties count as not accurate."""
    cols = {"loss": losses.detach(), "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": pol[:, 0].detach(), "logps/rejected": pol[:, 1].detach()}
    sums = (torch.stack([v.float() for v in cols.values()]) * w).sum(-1).cpu()  # one device-to-host copy
    return dict(zip(cols, sums.tolist()))


def set_lora_dropout(model, on: bool) -> None:
    """--lora-dropout acts in the training forward only: the reference and held-out rewards are dropout-free."""
    for m in wlt.lora_modules(model):
        m.dropout.train(on)


def held_out_metrics(model, evals: list[dict], ref_eval: torch.Tensor, micro: int, fwd: Forward,
                     objective: Objective) -> dict:
    """eval/<metric>: the named metrics' means over the held-out pairs, without dropout."""
    set_lora_dropout(model, False)
    with torch.no_grad():
        pol = dist.sharded_map(len(evals), micro, policy_logps, evals, model, fwd)
    set_lora_dropout(model, True)
    lengths = response_lengths(range(len(evals)), evals, pol.device)
    sums = pair_metrics(*objective(pol, ref_eval.to(pol.device), lengths), pol, torch.ones(len(evals)))
    return {f"eval/{k}": v / len(evals) for k, v in sums.items()}


def main():
    args = parse_args()
    begun = trainer.begin(args, "dpo")  # every check and the data first; only then is --out touched
    if begun is None:  # finished already
        return
    inputs, train, evals, stats = begun

    # ---- setup: policy (LoRA on the starting model, sharded under torchrun), reference, optimizer
    targets = args.lora_targets.split(",") if args.lora_targets else None
    model, tok, dev, unique_keys = models.setup_model(args, args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
    model.eval()  # no model dropout in DPO: policy and reference log-probs must be deterministic
    share = models.share_prompt_setting(args.share_prompt, model, args.activation_checkpointing)
    fwd = Forward(pad_id(tok), share, dev, args.dtype)
    objective = Objective(args.beta, args.loss_type, args.label_smoothing)
    plan = trainer.batch_plan(len(train), args.batch_size, args.epochs, args.seed, args.max_steps)
    per_epoch = trainer.steps_per_epoch(len(train), args.batch_size)
    ref_train, ref_eval = reference_logps(args, model, train, evals, plan, fwd, inputs)   # [epochs, N, 2], [N_eval, 2]
    # tokens through the model per pair, for tokens/s: the prompt counted with each response
    tokens = [2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in train]
    loop = trainer.Loop(args, model, plan, inputs, "dpo", len(evals), tokens)

    # ---- loop: one optimizer step per global batch of pairs
    set_lora_dropout(model, True)
    for step in loop.steps():
        sums, pairs = {}, 0.0  # named metrics summed over this rank's pairs, and how many pairs that is
        for idx, w in loop.micro_batches(step):  # this rank's share of the global batch
            pol = policy_logps(idx, train, model, fwd)                                 # [B, 2] log pi
            ref = ref_train[step // per_epoch, idx].to(dev)                            # [B, 2] log pi_ref, cached
            wts = torch.tensor(w, device=dev)                                          # [B] 0: a padding copy
            losses, chosen_rewards, rejected_rewards = objective(pol, ref, response_lengths(idx, train, dev))
            # the mean over the global batch's pairs; FSDP2 averages gradients over the W processes (its
            # default divisor), so x W turns that average back into the sum (x 1 in a single process)
            ((losses * wts).sum() * world_size() / len(plan[step])).backward()
            for k, v in pair_metrics(losses, chosen_rewards, rejected_rewards, pol, wts).items():
                sums[k] = sums.get(k, 0.0) + v
            pairs += sum(w)
        row = loop.optimizer_step(step, sums, pairs)  # all ranks' means; stop on NaN/inf; clip; AdamW + schedule
        if loop.eval_due(step):
            row.update(held_out_metrics(model, evals, ref_eval, loop.micro, fwd, objective))
        loop.log(row, shown=("loss", "rewards/accuracies"))
        if loop.checkpoint_due(step):
            loop.save_checkpoint(step)  # weights, optimizer, schedule, RNG: what --resume continues from
    loop.close()

    # ---- save: the merged HF checkpoint and adapter/ (PEFT layout), gathered to rank 0, then train_config.json
    trainer.save_final(args, model, tok, unique_keys, loop.opt, stats, inputs)


if __name__ == "__main__":
    run_main(main)
