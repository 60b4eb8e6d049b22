"""The synthetic world, the offline default: sort a short list of digits.

Prompt "sort: 7 3 9 1 =>", ideal response " 1 3 7 9". Candidate responses are the sorted list with 0-4
corruptions that keep the length (adjacent swap, digit replace). The gold reward is exact: the fraction of
positions equal to the sorted list, minus 0.1 per missing or extra item. "Human" labels follow the
Bradley-Terry model (wlt.py, Eq. 1) of the gold margin, P(prefer a) = sigmoid((gold_a - gold_b) / tau), so
the simulated annotators err mostly on close pairs, as the paper finds real ones do. A word-level tokenizer
and two tiny randomly initialised Llama models are saved in the standard HF layout, so that every later stage
loads them exactly as it would load OPT.
"""
from __future__ import annotations

import random

import torch

import wlt

DEFAULTS = {"num_pairs": 10000, "num_test": 1000, "tau": 0.3, "min_digits": 3, "max_digits": 6,
            "max_corruptions": 4}
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# The teacher ties its output head to its input embedding, as OPT-125M (the paper's teacher) does; the student
# does not. So `bash launch.sh` trains, checkpoints and labels with a tied model and with an untied one.
TEACHER_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                 "tie_word_embeddings": True}
STUDENT_SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
                 "tie_word_embeddings": False}


def digits(prompt: str) -> list[str]:
    """The digits a prompt asks to sort."""
    return prompt.replace("sort:", "").replace("=>", "").split()


def gold_reward(prompt: str, response: str) -> float:
    """Exact gold reward of the synthetic world: fraction of positions equal to the sorted prompt digits,
    minus 0.1 per missing or extra item (EOS and anything after it are not part of `response`)."""
    target = sorted(digits(prompt))
    got = response.split()
    right = sum(1 for a, b in zip(got, target) if a == b)
    return right / len(target) - 0.1 * abs(len(got) - len(target))


def _corrupt(rng: random.Random, xs: list[str], k: int) -> list[str]:
    xs = list(xs)
    for _ in range(k):
        i = rng.randrange(len(xs))
        if rng.random() < 0.5 and len(xs) > 1:
            j = i + 1 if i + 1 < len(xs) else i - 1
            xs[i], xs[j] = xs[j], xs[i]
        else:
            xs[i] = rng.choice([d for d in "0123456789" if d != xs[i]])
    return xs


def make_pairs(n: int, seed: int, tau: float = 0.3, min_digits: int = 3, max_digits: int = 6,
               max_corruptions: int = 4, exclude: set | None = None) -> list[dict]:
    """n synthetic pairs with "human" (Bradley-Terry) labels. Each row also records gold_chosen/gold_rejected
    (exact) for the analysis; training uses prompt/chosen/rejected only. Prompts in `exclude` are redrawn."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        xs = [str(rng.randrange(10)) for _ in range(rng.randint(min_digits, max_digits))]
        prompt = "sort: " + " ".join(xs) + " =>"
        if exclude and prompt in exclude:
            continue
        target = sorted(xs)
        a = " " + " ".join(_corrupt(rng, target, rng.randint(0, max_corruptions)))
        b = " " + " ".join(_corrupt(rng, target, rng.randint(0, max_corruptions)))
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        if ga == gb:  # equal gold: no right answer to label; draw again
            continue
        p_a = wlt.preference_probability((ga - gb) / tau)  # Eq. 1 of an exact gold reward
        if rng.random() < p_a:
            rows.append({"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": ga, "gold_rejected": gb})
        else:
            rows.append({"prompt": prompt, "chosen": b, "rejected": a, "gold_chosen": gb, "gold_rejected": ga})
    return rows


def make_tokenizer():
    """A word-level tokenizer over the world's words, with BOS prepended (its "own special tokens")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + ["sort:", "=>"] + list("0123456789"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model(tok, shape: dict, seed: int, out_dir: str) -> None:
    """A tiny randomly initialised Llama-architecture causal LM, saved in the standard HF layout. shape holds
    the sizes and tie_word_embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
