"""Peak resident memory of real training steps on CPU, for tests/test_scale.py (run as a subprocess):

    python tests/measure_step.py CONFIG.json KIND LORA_RANK MICRO SEQ_LEN AC

KIND sft (full-length sequences, response = last 3/4) or dpo (pairs of full-length sequences, unshared);
prints {"peak": bytes}: the process's peak RSS during model creation and two optimizer steps, above its RSS
before the model existed. Run it with MALLOC_MMAP_THRESHOLD_=65536: glibc otherwise raises its mmap threshold
after the first large free and serves later tensors from the heap, whose freed blocks stay resident, so RSS
would count dead transients; with the threshold fixed, freed tensors go back to the system and RSS tracks the
live ones, which is what the estimate predicts."""
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wlt  # noqa: E402
from lib import dist, estimate  # noqa: E402


def rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def main():
    cfg_path, kind, lora, micro, L, ac = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
    from transformers import AutoModelForCausalLM
    cfg = estimate.model_config(cfg_path)
    torch.manual_seed(0)
    torch.randn(64, 64) @ torch.randn(64, 64)  # libraries loaded before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss("VmRSS")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if lora:
        wlt.add_lora(model, lora, 2.0 * lora)
    if ac:
        dist.enable_activation_checkpointing(model)
    model.train() if kind == "sft" else model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    V, P = cfg.vocab_size, L // 4
    for _ in range(2):
        if kind == "sft":
            ids = torch.randint(3, V, (micro, L), generator=g)
            labels = ids.clone()
            labels[:, :P] = wlt.IGNORE
            loss = wlt.sft_loss(wlt.response_logps(model, ids, torch.ones_like(ids), labels), int((labels != wlt.IGNORE).sum()))
        else:
            exs = [{k: torch.randint(3, V, (n,), generator=g).tolist() for k, n in
                    (("prompt_ids", P), ("chosen_ids", L - P), ("rejected_ids", L - P))} for _ in range(micro)]
            pol = wlt.pair_logps(model, exs, 0, pack=False)
            loss = wlt.dpo_loss(pol[:, 0], pol[:, 1], pol[:, 0].detach() + 1, pol[:, 1].detach(), 0.1)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"peak": rss("VmHWM") - base}))


if __name__ == "__main__":
    main()
