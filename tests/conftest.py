"""Shared fixtures: tiny models of several families built from configs (random init, saved with
save_pretrained) and a byte-level BPE tokenizer trained in-process. Nothing is downloaded.

WLT_TEST_DEVICE picks the device the suite runs on: `cpu` (the default) or `cuda`. With `cuda`, every tensor
and model the tests build in this process is created on the GPU (torch's default device), and the project's
scripts the tests start run on the GPU in fp32 (`--dtype fp32`; their own default there is bf16 autocast), so
the tests' fp32 tolerances hold (WLT_TEST_SCRIPT_DTYPE=default leaves them their default, for the tests that
check what a run does rather than its digits); a test that starts more processes than there are GPUs is skipped. With
`cpu`, CUDA is hidden from the tests and the scripts they start, so a machine with a GPU runs the same suite
as one without."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "extras"))  # bench.py, judge.py, experiments.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_DEVICE = os.environ.get("WLT_TEST_DEVICE", "cpu")
SCRIPT_DTYPE = os.environ.get("WLT_TEST_SCRIPT_DTYPE", "fp32")  # on cuda: the scripts' --dtype, or "default"
if TEST_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read by CUDA at its first use: this process and every script it starts
elif TEST_DEVICE == "cuda":
    if not torch.cuda.is_available():
        pytest.exit("WLT_TEST_DEVICE=cuda, but torch sees no CUDA device here; unset it to run on the CPU", returncode=4)
    torch.set_default_device("cuda")
else:
    pytest.exit(f"WLT_TEST_DEVICE={TEST_DEVICE!r}: use cpu (the default) or cuda", returncode=4)

# Real HH-RLHF rows in the hub's format ({"chosen": ..., "rejected": ...} per line), for the few tests that
# check the dialogue split and label.py on real text: a local file named by WLT_HH_SAMPLE; they skip without it.
HH_SAMPLE = os.environ.get("WLT_HH_SAMPLE", "")

CORPUS = [
    "Human: what are some pranks with a pen i can do? Assistant: Are you looking for practical joke ideas?",
    "The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow.",
    "Human: How do I bake bread at home? Assistant: Mix flour, water, salt and yeast, then let it rise.",
    "Summaries should be short. TL;DR: keep it brief, and say what matters first.",
    "sort: 7 3 9 1 => 1 3 7 9. Numbers 0123456789 and punctuation !?.,;:'\"()[]{}",
] * 3


def make_bpe_tokenizer(vocab_size: int = 300):
    """A real byte-level BPE (with merges) trained on a few sentences, wrapped for transformers, with
    BOS prepended like OPT's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(family: str, vocab_size: int):
    from transformers import OPTConfig, GPT2Config, LlamaConfig, GPTNeoXConfig
    if family == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                         num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                          bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


FAMILIES = ["opt", "gpt2", "llama", "gpt_neox"]


@pytest.fixture
def one_thread():
    """torch on one thread while a test runs scripts in its own process on tiny models: their steps are too small
    for threads to share, and on a busy machine threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return make_bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """factory(family) -> folder with a randomly initialised tiny model + the BPE tokenizer (cached)."""
    from transformers import AutoModelForCausalLM
    cache = {}

    def make(family: str) -> str:
        if family not in cache:
            d = str(tmp_path_factory.mktemp(f"tiny-{family}"))
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(family, len(bpe_tokenizer)))
            model.save_pretrained(d)
            bpe_tokenizer.save_pretrained(d)
            cache[family] = d
        return cache[family]
    return make


def weighty_config(family: str, vocab_size: int, big: bool = False):
    """A model whose weights dominate a process's memory next to activations of a few KB for short sequences,
    for host-memory measurements: ~50 MiB in fp32, or ~250 MiB with big (the runtime's fixed ~30 MiB of a
    first forward is then small beside it)."""
    from transformers import GPTNeoXConfig, LlamaConfig
    hidden, layers, ffn = (1024, 5, 2816) if big else (512, 4, 1376)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                           num_key_value_heads=8, intermediate_size=ffn, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                             intermediate_size=int(1.5 * ffn), max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


@pytest.fixture(scope="session")
def weighty_model_dir(tmp_path_factory, bpe_tokenizer):
    """factory(family, big=False) -> folder with a randomly initialised model whose weights dominate
    (weighty_config) + the BPE tokenizer (cached)."""
    from transformers import AutoModelForCausalLM
    cache = {}

    def make(family: str, big: bool = False) -> str:
        if (family, big) not in cache:
            d = str(tmp_path_factory.mktemp(f"weighty-{family}{'-big' if big else ''}"))
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(weighty_config(family, len(bpe_tokenizer), big)).save_pretrained(d)
            bpe_tokenizer.save_pretrained(d)
            cache[family, big] = d
        return cache[family, big]
    return make


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """A small synthetic run directory (prepare only): 600 pairs, 100 test pairs."""
    import subprocess
    d = str(tmp_path_factory.mktemp("synrun"))
    subprocess.run([sys.executable, os.path.join(ROOT, "wlt.py"), "prepare", "--data", "synthetic", "--out", d,
                    "--num-pairs", "600", "--num-test", "100"], check=True, capture_output=True)
    return d


DTYPE_SCRIPTS = {"train_sft.py", "train_dpo.py", "label.py", "evaluate.py"}  # the scripts with --dtype


def on_test_device(args: tuple) -> list:
    """A script's command line as the suite runs it: with WLT_TEST_DEVICE=cuda, a script that has --dtype
    (named among the first arguments: after torchrun's or tests/inject.py's own) gets --dtype fp32, unless
    WLT_TEST_SCRIPT_DTYPE=default."""
    if (TEST_DEVICE == "cuda" and SCRIPT_DTYPE != "default" and "--dtype" not in args
            and any(os.path.basename(str(a)) in DTYPE_SCRIPTS for a in args[:6])):
        return [*args, "--dtype", SCRIPT_DTYPE]
    return list(args)


def run_script(*args, env=None, check=True):
    """Run a project script in a subprocess; returns CompletedProcess (stdout/stderr captured)."""
    import subprocess
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, *on_test_device(args)], cwd=ROOT, capture_output=True, text=True, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def torchrun(nproc: int, *args, env=None, check=True):
    """Run a project script under torchrun on CPU (gloo) with nproc processes; with WLT_TEST_DEVICE=cuda, on
    nproc GPUs (nccl), and the test is skipped where there are fewer."""
    if TEST_DEVICE == "cuda" and torch.cuda.device_count() < nproc:
        pytest.skip(f"{nproc} processes need {nproc} GPUs under WLT_TEST_DEVICE=cuda; "
                    f"this machine has {torch.cuda.device_count()}")
    return run_script("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args,
                      env=dict({"OMP_NUM_THREADS": "1"}, **(env or {})), check=check)


def make_rm(kind: str, d: str) -> str:
    """A tiny randomly initialised sequence-classification reward model with one output: "chat" (Llama with
    a chat template, like the Mistral-7B reward model; "chat-pad-eos": the same padding with EOS) or "pair"
    (DeBERTa-v2 with a text-pair template and segment ids)."""
    from tokenizers import processors
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
    tok = make_bpe_tokenizer()
    torch.manual_seed(1)
    if kind == "chat-pad-eos":  # no own pad token: padding with EOS, which also ends every chat turn
        tok.pad_token = tok.eos_token
        kind = "chat"
    if kind == "chat":
        tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=256))
    else:
        s, e = tok.bos_token_id, tok.eos_token_id
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", s), ("</s>", e)])
        model = DebertaV2ForSequenceClassification(DebertaV2Config(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=256, type_vocab_size=2))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    if kind == "pair":  # the tokenizer also returns segment ids, as BERT-style reward models need
        import json
        cfg_path = os.path.join(d, "tokenizer_config.json")
        cfg = json.load(open(cfg_path))
        cfg["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        json.dump(cfg, open(cfg_path, "w"))
    return d


# Chat templates written for the tests in the style of two real families (nothing is downloaded):
#   chatml  SmolLM2/Qwen style: <|im_start|>role\ncontent<|im_end|>\n per turn, no BOS; EOS is <|im_end|>, so a
#           rendered response already ends with it (then the template's newline)
#   llama3  Llama-3 style: BOS in the text, <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|> per
#           turn; EOS is <|end_of_text|> (the base model's), so the trainers append it after <|eot_id|>
CHAT_STYLES = {
    "chatml": {
        "tokens": ["<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>", "bos": None,
        "template": ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                     "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                     "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")},
    "llama3": {
        "tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "eos": "<|end_of_text|>", "bos": "<|begin_of_text|>",
        "template": ("{{ bos_token }}{% for m in messages %}"
                     "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                     "{% endif %}")},
}


def make_chat_tokenizer(style: str):
    """The test BPE tokenizer with a chat template of CHAT_STYLES and its special tokens."""
    st = CHAT_STYLES[style]
    tok = make_bpe_tokenizer()
    tok.add_tokens(st["tokens"], special_tokens=True)
    tok.eos_token = st["eos"]
    from tokenizers import processors  # a text tokenized alone starts with the family's BOS, or none (SmolLM2)
    if st["bos"]:
        tok.bos_token = st["bos"]
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{st['bos']} $A", special_tokens=[(st["bos"], tok.bos_token_id)])
    else:
        tok.bos_token = None
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    tok.chat_template = st["template"]
    return tok


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """factory(style) -> folder with a tiny randomly initialised Llama (512 positions) and a chat tokenizer."""
    from transformers import AutoModelForCausalLM
    cache = {}

    def make(style: str) -> str:
        if style not in cache:
            d = str(tmp_path_factory.mktemp(f"chat-{style}"))
            tok = make_chat_tokenizer(style)
            cfg = tiny_config("llama", len(tok))
            cfg.max_position_embeddings = 512
            cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
            tok.save_pretrained(d)
            cache[style] = d
        return cache[style]
    return make
