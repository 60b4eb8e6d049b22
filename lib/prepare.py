"""`python wlt.py prepare`: a run's data splits (data/labeled.jsonl = D_l, unlabeled.jsonl = D_u, test.jsonl)
and its config.json, the settings every later stage reads its defaults from.

The split comes first, a seeded permutation of the source rows that needs no tokenizer (labeled / unlabeled,
and test for sources without a test split), then the paper's length filter per part, counted. So a teacher
and a student of different tokenizers see the same D_l and D_u.
"""
from __future__ import annotations

import argparse
import os
import random

from lib import synthetic
from lib.console import HelpFormatter, WltError, log
from lib.data import Skips, load_source, pair_to_row, tokenize_pairs, usable_pairs
from lib.defaults import PAPER_DEFAULTS, SYNTHETIC_DEFAULTS
from lib.files import fingerprint, same_settings, write_json, write_jsonl
from lib.models import load_tokenizer

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="hh-rlhf | tldr | synthetic | a local .jsonl(.gz)/.json/.parquet file or folder | any hub "
                        "dataset by name (docs/data.md lists the layouts read)")
    p.add_argument("--data-config", default=None, help="hub dataset: its configuration (subset), for sets that have several")
    p.add_argument("--train-split", default="train", help="hub dataset: the split the training pairs come from")
    p.add_argument("--test-split", default="test",
                   help="hub dataset: the test split (when the set has no split of this name, the test pairs are "
                        "carved from the training split, --test-fraction)")
    p.add_argument("--out", required=True, help="the run directory, e.g. runs/NAME")
    p.add_argument("--labeled-fraction", type=float, default=None,
                   help="share of the training pairs that keeps human labels (D_l); default 0.5 (paper), 0.2 synthetic")
    p.add_argument("--test-fraction", type=float, default=0.1, help="test share for sources without a test split")
    p.add_argument("--seed", type=int, default=22, help="seed of the labeled/unlabeled split (paper: 22)")
    p.add_argument("--max-len", type=int, default=512,
                   help="pairs whose prompt + longer response exceed this many tokens are dropped (counted); every "
                        "later stage of the run uses it as its --max-len")
    p.add_argument("--tokenizer", default=None, help="tokenizer for the length filter (default: the teacher model's)")
    p.add_argument("--teacher-model", default=None, help="teacher base model, recorded in config.json "
                                                         "(default: facebook/opt-125m; synthetic: a tiny Llama)")
    p.add_argument("--student-model", default=None, help="student base model, recorded in config.json "
                                                         "(default: facebook/opt-1.3b; synthetic: a tiny Llama)")
    p.add_argument("--beta", type=float, default=None, help="DPO beta recorded for the run (default 0.1; synthetic 0.5)")
    p.add_argument("--strict", action="store_true", help="make every skipped source row an error")
    p.add_argument("--overwrite", action="store_true",
                   help="prepare again even if config.json records the same settings (otherwise there is nothing to do)")
    w = synthetic.DEFAULTS
    p.add_argument("--num-pairs", type=int, default=None, help=f"synthetic: training pairs (default {w['num_pairs']})")
    p.add_argument("--num-test", type=int, default=None, help=f"synthetic: test pairs (default {w['num_test']})")
    p.add_argument("--tau", type=float, default=None,
                   help=f"synthetic: Bradley-Terry temperature of the human labels (default {w['tau']})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="wlt.py prepare", formatter_class=HelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def _permute_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A tokenizer-free seeded permutation: the first `fraction` of it goes to the first part."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    k = round(fraction * len(rows))
    return [rows[i] for i in sorted(idx[:k])], [rows[i] for i in sorted(idx[k:])]


def length_filter(tok, items: list[tuple[dict, str, str]], max_len: int, skips: Skips, part: str) -> list[tuple[dict, str, str]]:
    """items: [(pair, "file:line", layout)] -> the pairs with len(prompt_ids) + len(longer response ids) <= max_len
    (the paper's filter: a documented count, so --strict does not apply to it). A response with no tokens at
    all is a skip (an error under --strict)."""
    toks, _ = tokenize_pairs(tok, [it[0] for it in items], desc=f"length filter ({part})")
    kept = usable_pairs(toks, [it[1] for it in items], max_len, skips, too_long="drop")
    return [items[i] for i in kept]


def _synthetic_source(args, out: str) -> tuple[dict, dict, dict, str, str, dict]:
    """The synthetic world's pairs (and its tiny models in out/models/ unless models are given)."""
    world = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in synthetic.DEFAULTS.items()}
    models_dir = os.path.join(out, "models")
    tok = synthetic.make_tokenizer()
    teacher = args.teacher_model or os.path.join(models_dir, "teacher-base")
    student = args.student_model or os.path.join(models_dir, "student-base")
    if not args.teacher_model:
        synthetic.make_model(tok, synthetic.TEACHER_SHAPE, args.seed, teacher)
    if not args.student_model:
        synthetic.make_model(tok, synthetic.STUDENT_SHAPE, args.seed + 1, student)
    wargs = {k: world[k] for k in ("tau", "min_digits", "max_digits", "max_corruptions")}
    train_rows = synthetic.make_pairs(world["num_pairs"], args.seed, **wargs)
    # test prompts never seen in training, so evaluation measures generalisation, not recall
    test_rows = synthetic.make_pairs(world["num_test"], args.seed + 10_000,
                                     exclude={r["prompt"] for r in train_rows}, **wargs)
    source = {"train": train_rows, "test": test_rows}
    locs = {k: [f"synthetic/{k}:{i}" for i in range(1, len(v) + 1)] for k, v in source.items()}
    layouts = {k: ["text"] * len(v) for k, v in source.items()}
    return source, locs, layouts, teacher, student, world


def prepare(args) -> dict | None:
    """Write runs/NAME/data/{labeled,unlabeled,test}.jsonl and config.json. Returns the config, or None when
    config.json already records the same settings and an unchanged source (nothing to do)."""
    # absolute: the paths config.json records (the synthetic models, the tokenizer) must hold from any working
    # folder, since `torchrun train_sft.py --teacher` may be started outside the repository
    out = os.path.abspath(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("cmd", "overwrite")}
    inputs = {"data": fingerprint(args.data)}
    marker = os.path.join(out, "config.json")
    # where the run lives is not one of its settings: the same run named by another path is the same run
    if not args.overwrite and same_settings(marker, settings, inputs, ignore=("out",)):
        log(f"{marker}: prepared already with the same settings; nothing to do (--overwrite prepares again)")
        return None
    if os.path.isfile(marker):
        log(f"{marker}: settings or source changed; preparing again (later stages will rerun)")
        os.remove(marker)
    data_dir = os.path.join(out, "data")
    skips = Skips(strict=args.strict)
    syn = args.data == "synthetic"
    defaults = SYNTHETIC_DEFAULTS if syn else PAPER_DEFAULTS
    labeled_fraction = args.labeled_fraction if args.labeled_fraction is not None else defaults.get("labeled_fraction", 0.5)
    beta = args.beta if args.beta is not None else defaults["beta"]
    world = None
    if syn:
        source, locs, layouts, teacher, student, world = _synthetic_source(args, out)
    else:
        teacher = args.teacher_model or PAPER_DEFAULTS["teacher_model"]
        student = args.student_model or PAPER_DEFAULTS["student_model"]
        locs, layouts = {}, {}
        source = load_source(args.data, skips, locs, layouts, args.data_config, args.train_split, args.test_split)
    tok_path = args.tokenizer or teacher
    tok = load_tokenizer(tok_path)  # for the length filter only
    pool = list(zip(source["train"], locs["train"], layouts["train"]))  # (pair, "file:line", its row layout)
    test = list(zip(source["test"], locs["test"], layouts["test"]))
    if not pool:
        raise WltError(f"{args.data}: no usable pairs in the training split")
    if not test:  # no test split in the source: carve one first, from the same seeded permutation
        test, pool = _permute_split(pool, args.test_fraction, args.seed)
    labeled, unlabeled = _permute_split(pool, labeled_fraction, args.seed)
    counts = {}
    parts = {"labeled": labeled, "unlabeled": unlabeled, "test": test}
    for name in parts:
        before = len(parts[name])
        part_skips = Skips(strict=args.strict)
        parts[name] = length_filter(tok, parts[name], args.max_len, part_skips, name)
        counts[name] = {"before_length_filter": before, "kept": len(parts[name]), "skipped": dict(part_skips.counts),
                        "skipped_examples": {k: list(v) for k, v in part_skips.where.items()}}
        log(f"{name}: {len(parts[name])} pairs kept of {before}"
            + "".join(f"; {n} {r}" for r, n in part_skips.counts.items()))
    skips.report(args.data)
    # the length limit goes into every stage's settings: the trainers cut to it what label.py reads whole
    sft_t = dict(defaults["sft"], max_len=args.max_len)
    sft_s = dict(defaults.get("sft_student", defaults["sft"]), max_len=args.max_len)
    dpo = dict(defaults["dpo"], beta=beta, max_len=args.max_len)
    config = {
        "source": args.data, "labeled_fraction": labeled_fraction, "seed": args.seed, "max_len": args.max_len,
        "tokenizer": tok_path, "teacher_model": teacher, "student_model": student, "beta": beta,
        "synthetic": world, "counts": counts, "source_skips": skips.as_dict(), "args": settings, "inputs": inputs,
        "train": {
            "train_sft.py": {"teacher": dict(sft_t, model=teacher), "student": dict(sft_s, model=student)},
            "train_dpo.py": {"teacher": dpo, "student": dict(dpo, **defaults.get("dpo_student", {}))},
        },
    }
    for name, items in parts.items():
        # conversational rows keep the layout they were read in: each stage renders them with its own tokenizer
        write_jsonl(os.path.join(data_dir, f"{name}.jsonl"), [pair_to_row(p, layout) for p, _, layout in items])
    write_json(os.path.join(out, "config.json"), config)  # last: its presence marks a complete prepare
    log(f"wrote {data_dir}/{{labeled,unlabeled,test}}.jsonl and {out}/config.json")
    return config
