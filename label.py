"""The weak teacher labels unlabeled pairs (Tao & Li section 3.2, Eq. 5): for each pair (x, y1, y2),
r(x, y) = beta * log(pi_w(y|x) / pi_ref(y|x)) with log-probs summed over the response tokens; the response
with the higher reward becomes "chosen".

    python label.py --teacher --run runs/demo                 data/unlabeled.jsonl -> data/weak.jsonl
    torchrun --nproc_per_node 2 label.py --teacher --run runs/demo
    python label.py --model PI_W --ref PI_REF --data pairs.jsonl --out weak.jsonl [--beta 0.1]

PI_W is a merged checkpoint, or a folder with adapter/ (as train_dpo.py writes) on top of PI_REF: then one
model is loaded and the adapter switched on (pi_w) and off (pi_ref). Under torchrun every process labels
a disjoint share of the pairs and rank 0 writes them in the input order.

Output rows: prompt, chosen, rejected (teacher order), chosen_reward, rejected_reward, human_agrees (the
teacher's chosen is the input's chosen), plus any other field of the input row (gold_chosen/gold_rejected
of the synthetic world follow their response). A summary JSON is written beside
the output (OUT with .summary.json): pair counts, skips, agreement with the input order, reward statistics,
pairs/s, settings. It is written last and marks a complete output: rerunning the same command on unchanged
inputs does nothing (--overwrite relabels). Exact reward ties (a teacher that cannot tell two responses apart)
are broken by a hash of the two texts, never by the input order, which is the human label.
"""
import argparse
import json
import os
import statistics
import time

import torch
from tqdm import tqdm

import wlt


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("what to label (either --teacher --run, or explicit paths)")
    g.add_argument("--teacher", action="store_true",
                   help="with --run: pi_w = teacher/dpo (its adapter on teacher/sft when present), pi_ref = "
                        "teacher/sft, data/unlabeled.jsonl -> data/weak.jsonl, beta from config.json")
    g.add_argument("--run", default=None, help="run directory made by `wlt.py prepare`")
    g.add_argument("--model", default=None, help="pi_w: merged checkpoint, or a folder with adapter/ on top of --ref")
    g.add_argument("--ref", default=None, help="pi_ref: the reference the teacher was trained from (its SFT model)")
    g.add_argument("--data", default=None, help="pair file to label (.jsonl: prompt, chosen, rejected)")
    g.add_argument("--out", default=None, help="labeled pair file to write (.jsonl)")
    o = ap.add_argument_group("labeling")
    o.add_argument("--beta", type=float, default=None,
                   help="beta of Eq. 5 (default: the run's beta with --run, else 0.1). It scales the rewards, "
                        "never the labels")
    o.add_argument("--batch-size", type=int, default=16,
                   help="pairs per batch (one prompt forward of B rows, one response forward of 2B rows, per model)")
    o.add_argument("--share-prompt", choices=["auto", "on", "off"], default="auto",
                   help="run each prompt once and share its KV cache between the two responses (auto: for the "
                        "families in wlt.SHARE_PROMPT); the same rewards as off, fewer tokens through the model")
    o.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence; longer prompts lose tokens from the left (default 512; --run: the run's)")
    o.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto = bf16 autocast on CUDA, fp32 on CPU")
    o.add_argument("--strict", action="store_true", help="turn every skipped row into an error")
    o.add_argument("--overwrite", action="store_true", help="relabel even if a complete output with the same settings exists")
    o.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    args = ap.parse_args()
    if args.run:
        if not args.teacher:
            ap.error("--run needs --teacher (label.py labels with the run's weak teacher)")
        d = os.path.join(args.run, "teacher")
        args.model = args.model or os.path.join(d, "dpo")
        args.ref = args.ref or os.path.join(d, "sft")
        args.data = args.data or os.path.join(args.run, "data", "unlabeled.jsonl")
        args.out = args.out or os.path.join(args.run, "data", "weak.jsonl")
        run_beta = wlt.run_defaults(args.run, "train_dpo.py", "teacher").get("beta", 0.1)  # also checks config.json
        for stage in (args.ref, args.model):  # a crashed retraining leaves old weights but no completion marker
            if not os.path.isfile(os.path.join(stage, "train_config.json")):
                raise wlt.WltError(f"{stage}: no finished training there (no train_config.json); train the teacher first")
        if args.beta is None:  # the beta the teacher was trained with (DPO_ARGS may have overridden the run's)
            args.beta = json.load(open(os.path.join(args.model, "train_config.json")))["args"].get("beta", run_beta)
        if args.max_len is None:  # the run's length limit, so D_u keeps every pair the human-label student sees
            args.max_len = wlt.read_run_config(args.run).get("max_len", 512)
    elif args.teacher:
        ap.error("--teacher needs --run")
    for k in ("model", "ref", "data", "out"):
        if getattr(args, k) is None:
            ap.error(f"--{k} is required (or use --teacher --run)")
    args.beta = 0.1 if args.beta is None else args.beta
    args.max_len = 512 if args.max_len is None else args.max_len
    return args


def load_teacher(args, dev):
    """(pi_w, pi_ref or None, tokenizer, how). pi_ref None means: pi_w with its adapter switched off."""
    adapter = os.path.join(args.model, "adapter")
    has_adapter = os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    for path in (args.ref,) if has_adapter else (args.ref, args.model):  # an adapter-only folder is fine
        wlt.check_model_dir(path)
    tok = wlt.load_tokenizer(args.ref, args.trust_remote_code)
    ref = wlt.load_model(args.ref, args.trust_remote_code)
    if has_adapter:
        base = json.load(open(os.path.join(adapter, "adapter_config.json"))).get("base_model_name_or_path")
        if base and os.path.exists(base) and os.path.abspath(base) != os.path.abspath(args.ref):
            wlt.log(f"warning: {adapter} was trained on {base}, applied here on --ref {args.ref}")
        wlt.load_adapter(ref, adapter)
        return ref.to(dev).eval(), None, tok, f"adapter {adapter} on/off over {args.ref}"
    pol = wlt.load_model(args.model, args.trust_remote_code)
    return pol.to(dev).eval(), ref.to(dev).eval(), tok, f"two models: {args.model} / {args.ref}"


def main():
    args = parse_args()
    inputs = {k: wlt.fingerprint(getattr(args, k)) for k in ("model", "ref", "data")}
    marker = wlt.summary_path(args.out)
    if not args.overwrite and os.path.isfile(args.out) and wlt.same_settings(marker, vars(args), inputs, ignore=("overwrite",)):
        wlt.log(f"{args.out}: already labeled with the same settings and inputs; nothing to do (--overwrite relabels)")
        return
    wlt.init_distributed()
    dev = wlt.device()
    if wlt.rank() == 0:  # from here on there is no output until the new one is complete
        for f in (marker, args.out):
            if os.path.isfile(f):
                os.remove(f)

    # ---- data: every rank reads and tokenizes all of it (cheap next to the forwards), then takes rows r::W
    pol, ref, tok, how = load_teacher(args, dev)
    wlt.log(f"teacher: {how}; beta {args.beta}; {wlt.world_size()} process(es) on {dev}")
    skips, locs = wlt.Skips(strict=args.strict), []
    pairs = wlt.read_pairs(args.data, skips, locs)
    n_rows = len(pairs) + skips.total()
    exs, fallbacks = wlt.tokenize_pairs(tok, pairs, desc=f"tokenize {args.data}")
    todo = []  # indices into pairs of the rows that can be labeled
    for i, (e, loc) in enumerate(zip(exs, locs)):
        if not e["chosen_ids"] or not e["rejected_ids"]:
            skips.add("a response has no tokens", loc)
        elif not e["prompt_ids"]:
            skips.add("the prompt has no tokens (and the tokenizer adds no BOS)", loc)
        elif (f := wlt.fit_pair(e, args.max_len)) is None:
            skips.add(f"a response alone does not fit --max-len {args.max_len}", loc)
        else:
            exs[i] = f
            todo.append(i)
    skips.report(args.data)
    if not todo:
        raise wlt.WltError(f"{args.data}: no pairs to label")

    # ---- batches of similar length (less padding), longest first, dealt out to the ranks in turn. The batches
    # do not depend on the number of processes, so 1 and N processes compute exactly the same numbers.
    lengths = [len(exs[i]["prompt_ids"]) + max(len(exs[i]["chosen_ids"]), len(exs[i]["rejected_ids"])) for i in todo]
    batches = [[todo[j] for j in b] for b in wlt.in_batches(lengths, args.batch_size)]
    pad = wlt.pad_id(tok)

    share = {"auto": None, "on": True, "off": False}[args.share_prompt]

    def label_batch(idx: list[int]) -> dict:
        """{pair index: [log pi_w(chosen), log pi_w(rejected), log pi_ref(chosen), log pi_ref(rejected)]}.
        Each prompt runs once per model and its KV cache serves both responses (wlt.pair_logps)."""
        batch = [exs[i] for i in idx]
        lw = wlt.pair_logps(pol, batch, pad, share)  # [B, 2]
        if ref is None:
            with wlt.lora_disabled(pol):
                lr = wlt.pair_logps(pol, batch, pad, share)
        else:
            lr = wlt.pair_logps(ref, batch, pad, share)
        t = torch.cat([lw, lr], dim=1).float().cpu()
        return {i: t[j].tolist() for j, i in enumerate(idx)}

    # finished batches are kept in OUT.partial/ as they are made: a killed run resumes where it stopped
    if args.overwrite and wlt.rank() == 0:  # relabel from scratch, not from an earlier run's batches
        wlt.remove_dir(args.out + ".partial")
    partial = wlt.Partial(args.out, {"args": {k: v for k, v in vars(args).items() if k != "overwrite"}, "inputs": inputs})
    resumed = sum(len(b) for k, b in enumerate(batches) if f"label:{k}" in partial.done)  # labeled before a kill
    t0 = time.time()
    bar = tqdm(total=len(todo), desc="label", unit="pair", disable=wlt.rank() != 0, mininterval=1.0)
    with torch.inference_mode(), wlt.autocast(dev, args.dtype):
        logps = wlt.run_batches(batches, label_batch, partial, "label", bar)  # rank 0: every pair; others: {}
    bar.close()
    seconds = time.time() - t0
    if wlt.rank() != 0:
        wlt.barrier()
        partial.remove()
        return

    # ---- Eq. 5 on the summed log-probs, then order each pair by the teacher's reward
    t = torch.tensor([logps[i] for i in todo], dtype=torch.float64)
    r_in_c = wlt.implicit_reward(t[:, 0], t[:, 2], args.beta)  # the input's chosen response
    r_in_r = wlt.implicit_reward(t[:, 1], t[:, 3], args.beta)
    # exact ties (pi_w cannot tell the responses apart) are broken by a hash of the pair's texts: fixed, and
    # unrelated to the input order, which is the human label
    tie_break = torch.tensor([wlt.text_tie_break(pairs[i]["chosen"], pairs[i]["rejected"]) for i in todo])
    keep = wlt.weak_labels(r_in_c, r_in_r, tie_break)
    ties = int((r_in_c == r_in_r).sum())
    if ties:
        wlt.log(f"warning: {ties} pair(s) with exactly equal rewards (is pi_w different from pi_ref?); "
                f"broken by a hash of the texts, not by the input order")
    rows = [wlt.relabeled_row(pairs[i], bool(keep[k]), float(r_in_c[k]), float(r_in_r[k])) for k, i in enumerate(todo)]
    wlt.write_jsonl(args.out, rows)

    margins = [r["chosen_reward"] - r["rejected_reward"] for r in rows]
    summary = {
        "rows": n_rows, "labeled": len(rows), "skipped": skips.as_dict(), "tokenizer_fallbacks": fallbacks,
        "agreement_with_input": sum(r["human_agrees"] for r in rows) / len(rows),
        "reward_margin": {"mean": statistics.fmean(margins), "std": statistics.pstdev(margins),
                          "min": min(margins), "median": statistics.median(margins), "max": max(margins),
                          "ties": sum(m == 0 for m in margins)},
        "chosen_reward_mean": statistics.fmean(r["chosen_reward"] for r in rows),
        "rejected_reward_mean": statistics.fmean(r["rejected_reward"] for r in rows),
        "pairs_per_s": (len(rows) - resumed) / max(seconds, 1e-9), "seconds": seconds, "resumed_pairs": resumed,
        "processes": wlt.world_size(),
        "teacher": how,
    }
    if all("gold_chosen" in r and "gold_rejected" in r for r in rows):  # synthetic world: exact gold rewards
        summary["gold_accuracy"] = {
            "weak": sum(r["gold_chosen"] > r["gold_rejected"] for r in rows) / len(rows),
            "input": sum(r["gold_chosen"] != r["gold_rejected"] and (r["gold_chosen"] > r["gold_rejected"]) == r["human_agrees"]
                         for r in rows) / len(rows)}
    summary.update(args=vars(args), inputs=inputs)
    wlt.write_json(marker, summary)  # last: marks the output complete
    wlt.barrier()
    partial.remove()
    wlt.log(f"wrote {args.out}: {len(rows)} pairs, agreement with the input order {summary['agreement_with_input']:.3f}, "
            f"{summary['pairs_per_s']:.1f} pairs/s" + (f", {skips.total()} skipped" if skips.total() else "")
            + ("; gold accuracy weak {weak:.3f} / input {input:.3f}".format(**summary["gold_accuracy"])
               if "gold_accuracy" in summary else ""))


if __name__ == "__main__":
    wlt.run_main(main)
