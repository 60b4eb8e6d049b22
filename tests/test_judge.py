"""judge.py against a local stand-in for an OpenAI-compatible endpoint on 127.0.0.1 (never a real endpoint):
labeling in label.py's format, both orders against position bias, repeated-judgement consistency, the win
rate, the API key sent as a header and written nowhere; and a local HF chat model read out at the answer."""
import json
import os
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import judge
from lib import models, runs
from lib.console import WltError

KEY = "sk-test-not-a-real-key-1234"


class StandIn:
    """POST /v1/chat/completions. mode "sorted": prefers the response that is a sorted digit list (the synthetic
    world's gold); "always-a": position-biased, always "A"; "coin": a fair coin per ask (seeded)."""

    def __init__(self, mode: str):
        self.mode, self.requests, self.keys = mode, [], set()
        self.rng = random.Random(0)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.keys.add(self.headers.get("Authorization"))
                outer.requests.append(body)
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                text = body["messages"][-1]["content"]
                a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", text, re.S).group(1)
                b = re.search(r"\[Response B\]\n(.*?)\n\nWhich", text, re.S).group(1)
                if outer.mode == "always-a":
                    ans = "A"
                elif outer.mode == "coin":
                    ans = outer.rng.choice("AB")
                else:
                    ans = "A" if outer.score(a) >= outer.score(b) else "B"
                reply = {"choices": [{"message": {"role": "assistant", "content": f"{ans}"}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def score(resp: str) -> float:
        xs = resp.split()
        return float(xs == sorted(xs)) - 0.01 * len(xs)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def server(request):
    s = StandIn(getattr(request, "param", "sorted"))
    yield s
    s.close()


def pairs_file(tmp_path, n=12):
    rows = []
    for i in range(n):
        xs = [str((i * 7 + k * 3) % 10) for k in range(4)]
        good, bad = " ".join(sorted(xs)), " ".join(sorted(xs, reverse=True))
        if good == bad:
            bad += " 0"
        first_good = i % 3 != 0  # the "human" order is wrong on every third pair
        rows.append({"prompt": f"sort: {' '.join(xs)} =>", "chosen": good if first_good else bad,
                     "rejected": bad if first_good else good, "gold_chosen": 1.0 if first_good else 0.0,
                     "gold_rejected": 0.0 if first_good else 1.0})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


def test_label_with_an_api_judge(server, tmp_path, monkeypatch):
    monkeypatch.setenv("WLT_JUDGE_API_KEY", KEY)
    data, rows = pairs_file(tmp_path)
    out = str(tmp_path / "weak-judge.jsonl")
    s = judge.label_pairs(judge.make_judge(server.url, "stand-in"), data, out)
    got = [json.loads(line) for line in open(out)]
    assert len(got) == len(rows)
    for src, r in zip(rows, got):
        assert r["chosen"].split() == sorted(r["chosen"].split())  # the judge picked the sorted response
        assert r["human_agrees"] == (src["gold_chosen"] == 1.0)
        assert r["gold_chosen"] == 1.0 and r["chosen_reward"] == 1.0 and r["rejected_reward"] == 0.0
    assert s["gold_accuracy"]["weak"] == 1.0 and s["agreement_with_input"] == pytest.approx(8 / 12)
    assert s["ties_position_bias"] == 0 and s["consistency"] == 1.0
    assert len(server.requests) == 2 * len(rows)  # both orders of every pair
    assert server.keys == {f"Bearer {KEY}"}
    for f in (out, runs.summary_path(out)):  # the key is sent, never written
        assert KEY not in open(f).read()
    assert server.requests[0]["model"] == "stand-in"
    assert judge.JUDGE_SYSTEM == server.requests[0]["messages"][0]["content"]


@pytest.mark.parametrize("server", ["always-a"], indirect=True)
def test_position_bias_becomes_ties(server, tmp_path):
    data, rows = pairs_file(tmp_path)
    out = str(tmp_path / "biased.jsonl")
    s = judge.label_pairs(judge.make_judge(server.url, "stand-in"), data, out)
    assert s["ties_position_bias"] == len(rows)  # "A" in both orders names different responses: no winner
    got = [json.loads(line) for line in open(out)]
    assert all(r["chosen_reward"] == 0.5 for r in got)
    # ties are broken by a hash of the texts, not by the input order (which is the human label)
    assert 0 < sum(r["human_agrees"] for r in got) < len(rows)


@pytest.mark.parametrize("server", ["coin"], indirect=True)
def test_repeated_judgement_consistency(server, tmp_path):
    data, rows = pairs_file(tmp_path, n=6)
    j = judge.make_judge(server.url, "stand-in", temperature=1.0)
    s = judge.label_pairs(j, data, str(tmp_path / "coin.jsonl"), repeats=5)
    assert len(server.requests) == 2 * 5 * len(rows)
    # a fair coin over 5 asks: the majority share is 3/5, 4/5 or 5/5, so the mean lies in [0.6, 1) here
    assert 0.6 <= s["consistency"] < 1.0


def test_win_rate_on_generations(server, tmp_path):
    gens = []
    for i in range(6):
        xs = [str((i + k) % 10) for k in range(3, 0, -1)]
        gens.append({"policy": "weak", "index": i, "prompt": "sort: " + " ".join(xs), "response": " ".join(sorted(xs))})
        gens.append({"policy": "human", "index": i, "prompt": "sort: " + " ".join(xs),
                     "response": " ".join(xs) if i < 4 else " ".join(sorted(xs))})
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(g) + "\n" for g in gens))
    r = judge.win_rate(judge.make_judge(server.url, "stand-in"), str(path), "weak", "human")
    assert r["prompts"] == 6 and r["win"] == pytest.approx(4 / 6) and r["loss"] == 0
    assert r["tie"] == pytest.approx(2 / 6)  # identical responses: "A" both times, a position tie
    with pytest.raises(WltError, match="no generations of policy 'nobody'"):
        judge.win_rate(judge.make_judge(server.url, "stand-in"), str(path), "weak", "nobody")
    apart = tmp_path / "apart.jsonl"  # two policies sampled on different prompts: nothing to compare
    apart.write_text("".join(json.dumps(dict(g, index=g["index"] + 100 * (g["policy"] == "human"))) + "\n" for g in gens))
    with pytest.raises(WltError, match="share no prompt"):
        judge.win_rate(judge.make_judge(server.url, "stand-in"), str(apart), "weak", "human")


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    data, _ = pairs_file(tmp_path, n=1)
    j = judge.make_judge("http://127.0.0.1:9/v1", "stand-in")
    j.retries = 1
    with pytest.raises(WltError, match="judge http://127.0.0.1:9/v1/chat/completions"):
        judge.label_pairs(j, data, str(tmp_path / "x.jsonl"))
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_local_chat_model_judge(tiny_model_dir, tmp_path, bpe_tokenizer):
    """A local HF chat model: the answer is read from p("A") vs p("B") after the prompt; both orders asked."""
    import shutil
    d = str(tmp_path / "chat")
    shutil.copytree(tiny_model_dir("llama"), d)
    tok = models.load_tokenizer(d)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(d)
    j = judge.make_judge(d)
    data, rows = pairs_file(tmp_path, n=4)
    # the read-out against the model itself: the chat text, one forward, the larger of the logits of "A", "B"
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    a_id, b_id = (tok(x, add_special_tokens=False).input_ids[0] for x in ("A", "B"))
    expected = []
    for r in rows:
        for y1, y2 in ((r["chosen"], r["rejected"]), (r["rejected"], r["chosen"])):
            text = tok.apply_chat_template(judge.messages(r["prompt"], y1, y2), tokenize=False, add_generation_prompt=True)
            with torch.no_grad():
                logits = model(torch.tensor([tok(text, add_special_tokens=False).input_ids])).logits[0, -1]
            want = "A" if logits[a_id] >= logits[b_id] else "B"
            assert j.ask(judge.messages(r["prompt"], y1, y2), 2, 0) == [want, want]
            expected.append(want)
    s = judge.label_pairs(j, data, str(tmp_path / "local.jsonl"))
    assert s["labeled"] == 4 and s["consistency"] == 1.0  # greedy: the same answer every time
    # a pair is a tie exactly when the model gives the same letter in both orders (position preference)
    assert s["ties_position_bias"] == sum(expected[2 * k] == expected[2 * k + 1] for k in range(4))
