"""Data contracts: the HH-RLHF split, reading pair files, local sources, the tokenization convention,
fitting and collation, `wlt.py prepare` (splits, length filter, config.json) and the synthetic world."""
import gzip
import json
import math
import os
import sys

import pytest
import torch

import wlt
from lib import commands, data, signals, synthetic
from lib.console import WltError
from conftest import ROOT, HH_SAMPLE, make_bpe_tokenizer, run_script

A = "\n\nAssistant:"


def write_jsonl(path, rows, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = gzip.open(path, "wt", encoding="utf-8") if gz else open(path, "w", encoding="utf-8")
    with f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def key(row):
    return json.dumps(row, sort_keys=True)


# ------------------------------------------------------------------------------------------------------
# 1. split_hh


def hh_sample_rows():
    if not os.path.isfile(HH_SAMPLE):
        pytest.skip("set WLT_HH_SAMPLE to a file of HH-RLHF rows to run it")
    return read_rows(HH_SAMPLE)


def test_split_hh_real_rows_reproduce_both_dialogues():
    rows = hh_sample_rows()
    assert len(rows) == 200
    with_turns = 0
    for i, r in enumerate(rows, 1):
        prompt, c, rj = data.split_hh(r["chosen"], r["rejected"])
        assert prompt + c == r["chosen"], i
        assert prompt + rj == r["rejected"], i
        assert prompt.endswith(A), i
        assert r["chosen"].startswith(prompt) and r["rejected"].startswith(prompt), i
        # the cut is the LAST marker of the shared prefix: no complete marker lies in the shared part of
        # the responses
        n = len(os.path.commonprefix([c, rj]))
        assert A not in (prompt + c[:n])[len(prompt) - len(A) + 1:], i
        with_turns += ("Human:" in c) or ("Human:" in rj)
    assert with_turns > 0  # the sample does hold responses with further turns: they were exercised


P = "\n\nHuman: Can you help me bake bread?" + A + " Sure, what kind?\n\nHuman: Sourdough." + A


@pytest.mark.parametrize("chosen_resp, rejected_resp, prompt_extra", [
    # responses with different further turns
    (" Yes.\n\nHuman: thanks\n\nAssistant: bye", " No.\n\nHuman: why?\n\nAssistant: because", ""),
    # responses that share a first turn: the shared turns belong to the prompt (last marker of the prefix)
    (" Ok.\n\nHuman: thanks\n\nAssistant: You're welcome.", " Ok.\n\nHuman: thanks\n\nAssistant: Go away.",
     " Ok.\n\nHuman: thanks" + A),
    # shared first word
    (" I think so.", " I don't know.", ""),
    # shared prefix ends in the middle of a later marker: fall back to the earlier, complete one
    (" Ok.\n\nHuman: thanks\n\nAssistant: fine", " Ok.\n\nHuman: thanks\n\nAssistance is not possible", ""),
    (" Ok.\n\nHuman: thanks\n\nAssistant: fine", " Ok.\n\nHuman: thanks\n\nAssistant", ""),
    # no space after the marker
    ("Yes", "No", ""),
    # one response is empty (split still exact; row_to_pair skips it)
    ("", " No.", ""),
])
def test_split_hh_hand_made(chosen_resp, rejected_resp, prompt_extra):
    chosen, rejected = P + chosen_resp, P + rejected_resp
    prompt, c, r = data.split_hh(chosen, rejected)
    assert prompt == P + prompt_extra
    assert c == chosen_resp[len(prompt_extra):]
    assert r == rejected_resp[len(prompt_extra):]
    assert prompt + c == chosen and prompt + r == rejected


def test_split_hh_errors():
    with pytest.raises(ValueError):
        data.split_hh(P + " same", P + " same")
    with pytest.raises(ValueError):  # no marker at all
        data.split_hh("\n\nHuman: hi there", "\n\nHuman: hello")
    with pytest.raises(ValueError):  # marker only after the shared prefix
        data.split_hh("\n\nHuman: hi" + A + " x", "\n\nHuman: ho" + A + " x")
    with pytest.raises(ValueError):  # the shared prefix stops inside the only marker
        data.split_hh("\n\nHuman: hi\n\nAssistant: x", "\n\nHuman: hi\n\nAssist: x")


# ------------------------------------------------------------------------------------------------------
# 2. read_pairs / row_to_pair

GOOD = {"prompt": "\n\nHuman: hi" + A, "chosen": " hello", "rejected": " go away"}


def test_read_pairs_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(str(tmp_path / "bad.jsonl"), [GOOD, "", '{"prompt": "x", "chosen": '])
    with pytest.raises(WltError) as e:
        data.read_pairs(path)
    assert f"{path}:3" in str(e.value)
    path2 = write_jsonl(str(tmp_path / "list.jsonl"), [GOOD, "[1, 2]"])
    with pytest.raises(WltError) as e:
        data.read_pairs(path2)
    assert f"{path2}:2" in str(e.value)


BAD_ROWS = {  # line content -> a word the skip reason must name
    "missing": ({"prompt": "p" + A, "chosen": " a"}, "rejected"),
    "nonstring": ({"prompt": "p" + A, "chosen": 3, "rejected": " b"}, "chosen"),
    "nonstring_prompt": ({"prompt": ["p"], "chosen": " a", "rejected": " b"}, "prompt"),
    "identical": ({"prompt": "p" + A, "chosen": " a", "rejected": " a"}, "identical"),
    "identical_hh": ({"chosen": "\n\nHuman: p" + A + " a", "rejected": "\n\nHuman: p" + A + " a"}, "identical"),
    "empty": ({"prompt": "p" + A, "chosen": "", "rejected": " b"}, "empty"),
    "unsplittable": ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}, "split"),
}


def test_read_pairs_skips_are_counted_with_locations(tmp_path):
    names = list(BAD_ROWS)
    ws = {"prompt": "p" + A, "chosen": " ", "rejected": " no"}  # whitespace-only response: real data, kept
    hh = {"chosen": "\n\nHuman: p" + A + " a", "rejected": "\n\nHuman: p" + A + " b"}
    lines = [GOOD] + [BAD_ROWS[n][0] for n in names] + [ws, "", hh]
    path = write_jsonl(str(tmp_path / "mixed.jsonl"), lines)
    skips = data.Skips()
    pairs = data.read_pairs(path, skips)
    assert pairs == [GOOD, ws, {"prompt": "\n\nHuman: p" + A, "chosen": " a", "rejected": " b"}]
    assert skips.total() == len(names)
    located = {loc: reason for reason, locs in skips.where.items() for loc in locs}
    for i, n in enumerate(names, 2):  # bad rows are on lines 2 .. len(names)+1
        loc = f"{path}:{i}"
        assert loc in located, n
        assert BAD_ROWS[n][1] in located[loc].lower(), (n, located[loc])
    assert sum(skips.counts.values()) == len(located)


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_read_pairs_strict_raises_on_skip(tmp_path, name):
    path = write_jsonl(str(tmp_path / f"{name}.jsonl"), [GOOD, BAD_ROWS[name][0]])
    assert len(data.read_pairs(path, data.Skips())) == 1
    with pytest.raises(WltError) as e:
        data.read_pairs(path, data.Skips(strict=True))
    assert f"{path}:2" in str(e.value)


def test_read_pairs_keeps_whitespace_only_response_under_strict(tmp_path):
    row = {"prompt": "p" + A, "chosen": " ", "rejected": " b"}
    path = write_jsonl(str(tmp_path / "ws.jsonl"), [row])
    assert data.read_pairs(path, data.Skips(strict=True)) == [row]


def test_row_to_pair_layouts():
    skips = data.Skips(strict=True)
    # pair form: unchanged, extra fields a producer added are kept
    row = dict(GOOD, chosen_reward=0.5)
    assert data.row_to_pair(row, "x:1", skips) == row
    # TL;DR layout: the summary goes on its own line after the post
    post = "SUBREDDIT: r/cooking\nTITLE: bread\nPOST: My bread never rises."
    tldr = {"prompt": post, "chosen": "TL;DR: yeast was dead", "rejected": "TL;DR: bread"}
    assert data.row_to_pair(tldr, "x:2", skips) == dict(tldr, prompt=post + "\n")
    for ending in ("\n", " "):  # already ends with whitespace: untouched
        r = dict(tldr, prompt=post + ending)
        assert data.row_to_pair(r, "x:3", skips)["prompt"] == post + ending
    # not TL;DR: no newline added
    r = {"prompt": "Question: why", "chosen": "because", "rejected": "no"}
    assert data.row_to_pair(r, "x:4", skips)["prompt"] == "Question: why"
    # Dahoas/full-hh-rlhf: prompt/response/chosen/rejected; "response" is not carried along
    d = {"prompt": "\n\nHuman: hi" + A, "response": " hello", "chosen": " hello", "rejected": " bye"}
    assert data.row_to_pair(d, "x:5", skips) == {"prompt": d["prompt"], "chosen": " hello", "rejected": " bye"}


def test_read_pairs_gz(tmp_path):
    hh = {"chosen": "\n\nHuman: p" + A + " a", "rejected": "\n\nHuman: p" + A + " b"}
    path = write_jsonl(str(tmp_path / "pairs.jsonl.gz"), [GOOD, hh], gz=True)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # really gzip
    assert data.read_pairs(path) == [GOOD, {"prompt": "\n\nHuman: p" + A, "chosen": " a", "rejected": " b"}]


# ------------------------------------------------------------------------------------------------------
# 3. load_source


def hh_dialogue(i, resp):
    return f"\n\nHuman: question {i}?{A} {resp}"


def test_load_source_hub_layout_folder(tmp_path, capsys):
    root = tmp_path / "hh"
    train = [{"chosen": hh_dialogue(i, "yes"), "rejected": hh_dialogue(i, "no")} for i in range(3)]
    test = [{"chosen": hh_dialogue(i, "good"), "rejected": hh_dialogue(i, "bad")} for i in range(10, 12)]
    helpful = [{"chosen": hh_dialogue(i, "sure"), "rejected": hh_dialogue(i, "never")} for i in range(20, 22)]
    write_jsonl(str(root / "harmless-base" / "train.jsonl.gz"), train, gz=True)
    write_jsonl(str(root / "harmless-base" / "test.jsonl.gz"), test, gz=True)
    write_jsonl(str(root / "helpful-base" / "train.jsonl.gz"), helpful, gz=True)
    write_jsonl(str(root / "red-team-attempts" / "train.jsonl.gz"),
                [{"transcript": "\n\nHuman: x" + A + " y", "min_harmlessness_score_transcript": 0.1}], gz=True)
    write_jsonl(str(root / "README.jsonl"), [{"chosen": "not", "rejected": "a split file"}])  # not train*/test*
    skips = data.Skips(strict=True)
    out = data.load_source(str(root), skips)
    want_train = {(f"\n\nHuman: question {i}?{A}", c, r)
                  for i, c, r in [(0, " yes", " no"), (1, " yes", " no"), (2, " yes", " no"),
                                  (20, " sure", " never"), (21, " sure", " never")]}
    assert {(p["prompt"], p["chosen"], p["rejected"]) for p in out["train"]} == want_train
    assert len(out["train"]) == 5
    assert [(p["chosen"], p["rejected"]) for p in out["test"]] == [(" good", " bad")] * 2
    assert skips.total() == 0
    assert "red-team-attempts" in capsys.readouterr().out  # skipped with a message, not silently


def test_load_source_dahoas_layout(tmp_path):
    root = tmp_path / "full-hh-rlhf" / "data"
    def rows(lo, hi):
        return [{"prompt": f"\n\nHuman: q{i}{A}", "response": f" r{i}", "chosen": f" r{i}", "rejected": f" w{i}"}
                for i in range(lo, hi)]
    write_jsonl(str(root / "train-00000-of-00001.jsonl"), rows(0, 4))
    write_jsonl(str(root / "test-00000-of-00001.jsonl"), rows(4, 6))
    out = data.load_source(str(tmp_path / "full-hh-rlhf"), data.Skips(strict=True))
    strip = lambda d: {k: v for k, v in d.items() if k != "response"}
    assert out["train"] == [strip(r) for r in rows(0, 4)]
    assert out["test"] == [strip(r) for r in rows(4, 6)]


def test_load_source_single_file_is_all_train_and_errors(tmp_path):
    path = write_jsonl(str(tmp_path / "pairs.jsonl"), [GOOD])
    assert data.load_source(path, data.Skips()) == {"train": [GOOD], "test": []}
    with pytest.raises(WltError):
        data.load_source(str(tmp_path / "nope"), data.Skips())
    (tmp_path / "empty").mkdir()
    with pytest.raises(WltError):
        data.load_source(str(tmp_path / "empty"), data.Skips())


# ------------------------------------------------------------------------------------------------------
# 4. tokenization convention


def check_convention(tok, pairs, toks):
    for p, t in zip(pairs, toks):
        assert t["prompt_ids"] == tok(p["prompt"]).input_ids
        assert t["prompt_ids"][0] == tok.bos_token_id
        for k in ("chosen", "rejected"):
            r = t[f"{k}_ids"]
            assert r[-1] == tok.eos_token_id and tok.eos_token_id not in r[:-1]
            assert t["prompt_ids"] + r[:-1] == tok(p["prompt"] + p[k]).input_ids


def test_tokenize_pairs_joint_convention(bpe_tokenizer):
    tok = bpe_tokenizer
    pairs = [
        {"prompt": "\n\nHuman: How do I bake bread?" + A, "chosen": " Mix flour, water and yeast.", "rejected": " No."},
        {"prompt": "sort: 7 3 9 1 =>", "chosen": " 1 3 7 9", "rejected": " 9 7 3 1"},
        {"prompt": "Human: hi" + A, "chosen": " ", "rejected": " ok"},  # whitespace-only response has a token
    ]
    toks, fallbacks = data.tokenize_pairs(tok, pairs)
    assert fallbacks == 0
    assert len(toks) == len(pairs)
    check_convention(tok, pairs, toks)
    assert len(toks[2]["chosen_ids"]) >= 2
    # chunking does not change anything
    assert data.tokenize_pairs(tok, pairs, batch=2) == (toks, 0)


def test_tokenize_pairs_real_hh_rows_need_no_fallback(bpe_tokenizer):
    rows = hh_sample_rows()
    pairs = [data.row_to_pair(r, f"hh:{i}", data.Skips(strict=True)) for i, r in enumerate(rows, 1)]
    toks, fallbacks = data.tokenize_pairs(bpe_tokenizer, pairs)
    assert fallbacks == 0
    check_convention(bpe_tokenizer, pairs, toks)


def find_fallback_case(tok):
    """A (prompt, response) whose joint byte-level BPE tokenization merges across the boundary."""
    for prompt in ("The quick ", "Human: hi Assistant: ", "sort: 7 3 9 1 => ", "Summaries should be "):
        for resp in ("brown fox", "hello", "judge my vow", "1 3 7 9", "short.", "the lazy dog"):
            n = len(tok(prompt).input_ids)
            if tok(prompt + resp).input_ids[:n] != tok(prompt).input_ids:
                return prompt, resp
    raise AssertionError("no candidate breaks the prefix property; the fallback test needs a new case")


def test_tokenize_pairs_fallback_is_taken_and_counted(bpe_tokenizer):
    tok = bpe_tokenizer
    prompt, resp = find_fallback_case(tok)
    other = " " + resp  # starts with its own space: the prompt's trailing space stays a token of its own
    n = len(tok(prompt).input_ids)
    assert tok(prompt + other).input_ids[:n] == tok(prompt).input_ids  # precondition: no fallback for this one
    toks, fallbacks = data.tokenize_pairs(tok, [{"prompt": prompt, "chosen": resp, "rejected": other}])
    assert fallbacks == 1
    (t,) = toks
    assert t["prompt_ids"] == tok(prompt).input_ids
    assert t["chosen_ids"] == tok(resp, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert t["prompt_ids"] + t["rejected_ids"][:-1] == tok(prompt + other).input_ids
    toks, fallbacks = data.tokenize_pairs(tok, [{"prompt": prompt, "chosen": resp, "rejected": resp + "!"}] * 3)
    assert fallbacks == 6


def test_tokenize_pairs_empty_response_gives_empty_ids(bpe_tokenizer):
    toks, _ = data.tokenize_pairs(bpe_tokenizer, [{"prompt": "Human: hi" + A, "chosen": "", "rejected": " ok"}])
    assert toks[0]["chosen_ids"] == []
    assert toks[0]["rejected_ids"][-1] == bpe_tokenizer.eos_token_id


def test_tokenize_pairs_without_eos_is_an_error():
    tok = make_bpe_tokenizer()
    tok.eos_token = None
    if tok.eos_token_id is not None:
        pytest.skip("this transformers version does not let a test unset the EOS token")
    with pytest.raises(WltError):
        data.tokenize_pairs(tok, [GOOD])


# ------------------------------------------------------------------------------------------------------
# 5. fit_pair and collation


def test_fit_pair_truncates_prompt_from_the_left():
    ex = {"prompt_ids": [1, 10, 11, 12, 13, 14], "chosen_ids": [20, 21, 2], "rejected_ids": [30, 31, 32, 33, 2]}
    orig = json.loads(json.dumps(ex))
    assert data.fit_pair(ex, 11) == ex  # 6 + 5 fits exactly
    got = data.fit_pair(ex, 8)  # longest response 5 -> 3 prompt tokens, the last ones
    assert got == {"prompt_ids": [12, 13, 14], "chosen_ids": [20, 21, 2], "rejected_ids": [30, 31, 32, 33, 2]}
    assert data.fit_pair(ex, 6)["prompt_ids"] == [14]
    assert data.fit_pair(ex, 5) is None  # the response alone fills max_len
    assert data.fit_pair(ex, 3) is None
    assert ex == orig  # the input is not modified


def test_collate_right_pads_and_masks_prompt():
    pad = 99
    b = wlt.collate([([1, 5, 6], [7, 8, 2]), ([1, 4], [2])], pad)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 8, 2], [1, 4, 2, pad, pad, pad]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 7, 8, 2], [-100, -100, 2, -100, -100, -100]]
    assert all(v.dtype == torch.long for v in b.values())


def test_collate_pairs_chosen_first_then_rejected():
    exs = [{"prompt_ids": [1, 3], "chosen_ids": [10, 2], "rejected_ids": [11, 12, 13, 2]},
           {"prompt_ids": [1, 4, 5, 6], "chosen_ids": [20, 2], "rejected_ids": [21, 2]}]
    b = wlt.collate_pairs(exs, pad=0)
    assert b["input_ids"].shape == (4, 6) and b["labels"].shape == (4, 6) and b["attention_mask"].shape == (4, 6)
    assert b["input_ids"].tolist() == [[1, 3, 10, 2, 0, 0], [1, 4, 5, 6, 20, 2],
                                       [1, 3, 11, 12, 13, 2], [1, 4, 5, 6, 21, 2]]
    assert b["labels"].tolist() == [[-100, -100, 10, 2, -100, -100], [-100, -100, -100, -100, 20, 2],
                                    [-100, -100, 11, 12, 13, 2], [-100, -100, -100, -100, 21, 2]]
    assert b["attention_mask"].sum(1).tolist() == [4, 6, 6, 6]


# ------------------------------------------------------------------------------------------------------
# 6. prepare

N_SRC = 50


def src_rows():
    rows = []
    for i in range(N_SRC):
        prompt = f"\n\nHuman: question {i}: how do I bake bread at home?{A}"
        chosen = " Mix flour, water, salt and yeast, then let it rise." * (1 + i % 6)
        rejected = " The quick brown fox jumps over the lazy dog." * (1 + (i * 5) % 4)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def src_file(tmp_path_factory):
    return write_jsonl(str(tmp_path_factory.mktemp("src") / "pairs.jsonl"), src_rows())


@pytest.fixture(scope="module")
def small_bpe_dir(tmp_path_factory):
    """A second tokenizer with no merges at all (one token per byte): much longer sequences."""
    d = str(tmp_path_factory.mktemp("bytes-tok"))
    make_bpe_tokenizer(vocab_size=259).save_pretrained(d)
    return d


def prepare_inproc(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["wlt.py", "prepare", *argv])
    commands.cli()
    out = argv[argv.index("--out") + 1]
    parts = {n: read_rows(os.path.join(out, "data", f"{n}.jsonl")) for n in ("labeled", "unlabeled", "test")}
    return json.load(open(os.path.join(out, "config.json"))), parts


def seq_len(tok, row):
    n = len(tok(row["prompt"]).input_ids)
    joint = [tok(row["prompt"] + row[k]).input_ids for k in ("chosen", "rejected")]
    assert all(j[:n] == tok(row["prompt"]).input_ids for j in joint)
    return n + max(len(j) - n + 1 for j in joint)  # + EOS


def test_prepare_cli_writes_splits_and_config(tmp_path, src_file, tiny_model_dir):
    out = str(tmp_path / "run")
    run_script("wlt.py", "prepare", "--data", src_file, "--out", out, "--tokenizer", tiny_model_dir("opt"),
               "--test-fraction", "0.2")
    cfg = json.load(open(os.path.join(out, "config.json")))
    parts = {n: read_rows(os.path.join(out, "data", f"{n}.jsonl")) for n in ("labeled", "unlabeled", "test")}
    # 50 rows, no test split in the source: 10 test, then 40 split half/half (paper default 0.5)
    assert {n: len(r) for n, r in parts.items()} == {"labeled": 20, "unlabeled": 20, "test": 10}
    assert cfg["labeled_fraction"] == 0.5 and cfg["beta"] == 0.1 and cfg["seed"] == 22
    for n, r in parts.items():
        assert cfg["counts"][n]["before_length_filter"] == cfg["counts"][n]["kept"] == len(r)
    # a partition of the source rows, nothing invented or duplicated
    all_rows = [key(r) for rs in parts.values() for r in rs]
    assert sorted(all_rows) == sorted(key(r) for r in src_rows())


def test_prepare_split_does_not_depend_on_tokenizer(tmp_path, monkeypatch, src_file, tiny_model_dir, small_bpe_dir):
    from transformers import AutoTokenizer
    tok_a, tok_b = AutoTokenizer.from_pretrained(tiny_model_dir("opt")), AutoTokenizer.from_pretrained(small_bpe_dir)
    rows = src_rows()
    max_len = max(seq_len(tok_a, r) for r in rows)  # nothing is filtered with tokenizer A
    too_long_b = {key(r) for r in rows if seq_len(tok_b, r) > max_len}
    assert 0 < len(too_long_b) < len(rows)  # precondition: B filters some rows, not all

    common = ["--data", src_file, "--test-fraction", "0.2", "--labeled-fraction", "0.3"]
    cfg_a, a = prepare_inproc(monkeypatch, *common, "--out", str(tmp_path / "a"), "--tokenizer", tiny_model_dir("opt"),
                              "--max-len", str(max_len))
    cfg_b, b = prepare_inproc(monkeypatch, *common, "--out", str(tmp_path / "b"), "--tokenizer", small_bpe_dir,
                              "--max-len", str(max_len))
    cfg_c, c = prepare_inproc(monkeypatch, *common, "--out", str(tmp_path / "c"), "--tokenizer", small_bpe_dir,
                              "--max-len", "100000")
    assert {n: len(r) for n, r in a.items()} == {"labeled": 12, "unlabeled": 28, "test": 10}
    sets = {run: {n: {key(r) for r in parts[n]} for n in parts} for run, parts in (("a", a), ("b", b), ("c", c))}
    # nothing filtered: identical splits whatever the tokenizer
    assert sets["a"] == sets["c"]
    for n in a:
        assert sets["b"][n] <= sets["a"][n]  # B only drops rows, never moves them to another part
        assert sets["b"][n] == sets["a"][n] - too_long_b
        counts = cfg_b["counts"][n]
        assert counts["before_length_filter"] == len(a[n])
        assert counts["kept"] == len(b[n])
        assert sum(counts["skipped"].values()) == len(a[n]) - len(b[n])
        assert cfg_a["counts"][n]["kept"] == cfg_a["counts"][n]["before_length_filter"] == len(a[n])
    assert sum(len(a[n]) - len(b[n]) for n in a) == len(too_long_b)
    assert not sets["b"]["labeled"] & sets["a"]["unlabeled"] and not sets["b"]["unlabeled"] & sets["a"]["labeled"]


def test_prepare_seed_determinism(tmp_path, monkeypatch, src_file, tiny_model_dir):
    common = ["--data", src_file, "--tokenizer", tiny_model_dir("opt"), "--test-fraction", "0.2"]
    _, x = prepare_inproc(monkeypatch, *common, "--out", str(tmp_path / "x"), "--seed", "5")
    _, y = prepare_inproc(monkeypatch, *common, "--out", str(tmp_path / "y"), "--seed", "5")
    _, z = prepare_inproc(monkeypatch, *common, "--out", str(tmp_path / "z"), "--seed", "6")
    for n in ("labeled", "unlabeled", "test"):
        assert open(tmp_path / "x" / "data" / f"{n}.jsonl", "rb").read() == \
            open(tmp_path / "y" / "data" / f"{n}.jsonl", "rb").read()
    assert {key(r) for r in x["labeled"]} != {key(r) for r in z["labeled"]}
    assert {key(r) for r in x["test"]} != {key(r) for r in z["test"]}


def test_prepare_real_hh_sample_keeps_every_row(tmp_path, monkeypatch, tiny_model_dir):
    hh_sample_rows()
    cfg, parts = prepare_inproc(monkeypatch, "--data", HH_SAMPLE, "--out", str(tmp_path / "hh"),
                                "--tokenizer", tiny_model_dir("opt"), "--max-len", "100000", "--strict")
    assert sum(len(r) for r in parts.values()) == 200
    assert cfg["source_skips"]["counts"] == {}
    rows = [r for rs in parts.values() for r in rs]
    assert any(not r["chosen"].strip() or not r["rejected"].strip() for r in rows)  # whitespace-only kept
    assert all(r["prompt"].endswith(A) for r in rows)


# ------------------------------------------------------------------------------------------------------
# synthetic world


def test_synthetic_run_defaults(synthetic_run):
    cfg = json.load(open(os.path.join(synthetic_run, "config.json")))
    parts = {n: read_rows(os.path.join(synthetic_run, "data", f"{n}.jsonl")) for n in ("labeled", "unlabeled", "test")}
    assert {n: len(r) for n, r in parts.items()} == {"labeled": 120, "unlabeled": 480, "test": 100}
    assert cfg["beta"] == 0.5 and cfg["labeled_fraction"] == 0.2
    assert cfg["train"]["train_dpo.py"]["teacher"]["beta"] == 0.5
    # labeled + unlabeled are exactly the generated pairs, in their human order (no flips, no losses)
    w = cfg["synthetic"]
    gen = synthetic.make_pairs(w["num_pairs"], cfg["seed"], tau=w["tau"], min_digits=w["min_digits"],
                                   max_digits=w["max_digits"], max_corruptions=w["max_corruptions"])
    assert sorted(key(r) for r in parts["labeled"] + parts["unlabeled"]) == sorted(key(r) for r in gen)
    for r in parts["unlabeled"][:50]:
        assert r["gold_chosen"] == synthetic.gold_reward(r["prompt"], r["chosen"])
        assert r["gold_rejected"] == synthetic.gold_reward(r["prompt"], r["rejected"])


def test_gold_reward_hand_computed():
    p = "sort: 3 1 2 =>"
    assert synthetic.gold_reward(p, " 1 2 3") == 1.0
    assert math.isclose(synthetic.gold_reward(p, " 1 3 2"), 1 / 3)
    assert math.isclose(synthetic.gold_reward(p, " 1 2"), 2 / 3 - 0.1)
    assert math.isclose(synthetic.gold_reward(p, " 1 2 3 3"), 1.0 - 0.1)
    assert math.isclose(synthetic.gold_reward(p, " 3 2 1"), 1 / 3)
    assert math.isclose(synthetic.gold_reward(p, ""), -0.3)
    assert math.isclose(synthetic.gold_reward("sort: 7 3 9 1 =>", " 1 3 7 9"), 1.0)


def test_bradley_terry_human_labels():
    def agree(tau):
        rows = synthetic.make_pairs(3000, seed=1, tau=tau)
        assert len(rows) == 3000
        assert all(r["gold_chosen"] != r["gold_rejected"] for r in rows)
        return sum(r["gold_chosen"] > r["gold_rejected"] for r in rows) / len(rows)
    assert 0.65 <= agree(0.3) <= 0.90
    assert agree(0.01) >= 0.995
    assert synthetic.make_pairs(20, seed=3) == synthetic.make_pairs(20, seed=3)


# ------------------------------------------------------------------------------------------------------
# 7. error paths of prepare


def test_prepare_wrong_path_is_a_one_line_error(tmp_path):
    out = str(tmp_path / "run")
    missing = str(tmp_path / "no-such-data.jsonl")
    p = run_script("wlt.py", "prepare", "--data", missing, "--out", out, check=False)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0]
    assert not os.path.exists(os.path.join(out, "config.json"))


def run_main_inproc(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["wlt.py", "prepare", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        signals.run_main(commands.cli)
    err = capsys.readouterr().err
    assert e.value.code == 1
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_prepare_error_paths_inproc(tmp_path, monkeypatch, capsys, tiny_model_dir):
    tokd = tiny_model_dir("opt")
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [GOOD, "{oops"])
    msg = run_main_inproc(monkeypatch, capsys, "--data", bad, "--out", str(tmp_path / "r1"), "--tokenizer", tokd)
    assert f"{bad}:2" in msg
    assert not os.path.exists(tmp_path / "r1" / "config.json")

    skip = write_jsonl(str(tmp_path / "skip.jsonl"), [GOOD, dict(GOOD, prompt="other" + A), BAD_ROWS["missing"][0]])
    msg = run_main_inproc(monkeypatch, capsys, "--data", skip, "--out", str(tmp_path / "r2"), "--tokenizer", tokd,
                          "--strict")
    assert f"{skip}:3" in msg
    cfg, _ = prepare_inproc(monkeypatch, "--data", skip, "--out", str(tmp_path / "r3"), "--tokenizer", tokd)
    assert sum(cfg["source_skips"]["counts"].values()) == 1
    assert [f"{skip}:3"] in cfg["source_skips"]["examples"].values()

    allbad = write_jsonl(str(tmp_path / "allbad.jsonl"), [BAD_ROWS["identical"][0]])
    run_main_inproc(monkeypatch, capsys, "--data", allbad, "--out", str(tmp_path / "r4"), "--tokenizer", tokd)

    empty_dir = tmp_path / "not-a-tokenizer"
    empty_dir.mkdir()
    msg = run_main_inproc(monkeypatch, capsys, "--data", skip, "--out", str(tmp_path / "r5"),
                          "--tokenizer", str(empty_dir))
    assert str(empty_dir) in msg


def test_synthetic_test_prompts_are_not_training_prompts(synthetic_run):
    read = lambda n: [json.loads(l) for l in open(os.path.join(synthetic_run, "data", f"{n}.jsonl"))]
    train = {r["prompt"] for n in ("labeled", "unlabeled") for r in read(n)}
    test = [r["prompt"] for r in read("test")]
    assert len(test) == 100 and not train & set(test)
    rows = synthetic.make_pairs(50, seed=5, exclude={"sort: 1 2 3 =>"} | set(test))
    assert not {r["prompt"] for r in rows} & (set(test) | {"sort: 1 2 3 =>"})


def test_prepare_reports_length_skips_with_file_and_line(tmp_path, tiny_model_dir):
    rows = [{"prompt": "p" * (400 if i == 3 else 5), "chosen": " a", "rejected": " b"} for i in range(10)]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_script(os.path.join(ROOT, "wlt.py"), "prepare", "--data", str(src), "--out", str(out),
               "--tokenizer", tiny_model_dir("llama"), "--max-len", "64", "--test-fraction", "0")
    counts = json.load(open(out / "config.json"))["counts"]
    skipped = [(k, v) for part in counts.values() for k, v in part["skipped_examples"].items()]
    assert skipped == [("longer than --max-len 64", [f"{src}:4"])]
