"""The GPU check: the code paths that only a CUDA machine runs, run once, each step one PASS/FAIL line with its
figure and a table last. On one GPU it takes about 10 minutes.

    python extras/gpu_check.py              on a CUDA machine: steps a-f at full size
    python extras/gpu_check.py --dry        anywhere: the same steps at a tiny shape (automatic without CUDA)

  a  the method's tests with their tiny models on the device (WLT_TEST_DEVICE, docs/tests.md): the kernel
     against the plain definition, the losses, LoRA, label.py, both trainers, the cached reference, the CUDA
     paths' checks; then the trainers' tests again with the scripts in their default dtype (bf16 autocast)
  b  `bash launch.sh` on the synthetic world; its results table against the CPU one printed in README.md:
     every policy's gold reward within 3 combined standard errors (sqrt(se_cpu^2 + se_gpu^2))
  c  a LoRA-DPO run with checkpoints every 2 steps, killed with SIGKILL before step 5 (tests/inject.py) and
     resumed with --resume: its final weights bit-equal to an uninterrupted run's. Every run of the step is
     deterministic (torch.use_deterministic_algorithms, through tests/inject.py): the memory-efficient
     attention's backward and cuBLAS otherwise choose their own summation order
  d  extras/bench.py at Llama-3.2-1B's shape (128,256-token vocabulary, random weights), sequences of ~1k
     tokens, 8 pairs per step: labeling, DPO and SFT, wlt against the plain baseline, peak device memory and
     the share of the measured bf16 matmul rate
  e  `python wlt.py estimate` for the DPO run of d against its measured peak (weights included): within 20%
  f  2 processes, with 2 GPUs or more (skipped on one): test_fsdp.py and test_cuda_paths.py on the GPUs,
     NCCL for gloo: 2 processes = 1, FSDP2's bf16 policy, the load broadcast from rank 0, a checkpoint saved and
     resumed through torch.distributed.checkpoint, the timeout and the ranks that see different files

Step d's plain baseline holds two models and [16, 1025, 128256] fp32 logits with their log-softmax beside the
activations of a DPO step: it is sized for a GPU of about 140 GB. On an 80 GB one that side may run out of
memory; the step then says which side failed, and keeps the other side's figures.

The dry mode says "no GPU" and runs every step on the CPU at a tiny shape (fp32, few steps), so the script
itself is tested; there, b, c and e report their figures but judge only that the step ran (a tiny world's
table is not the README's; CPU memory holds the libraries). Each step's output goes to its own log under
--out, the settings and every step's result to gpu_check.json there. The exit status is 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "extras")]

STEPS = "abcdef"
METHOD_TESTS = ["tests/test_kernel.py", "tests/test_math.py", "tests/test_lora.py", "tests/test_label.py",
                "tests/test_train.py", "tests/test_trainer_rules.py::test_reference_log_probs_are_cached_and_reused",
                "tests/test_cuda_paths.py", "-k", "not two_processes and not rank and not slow_rank"]
DEFAULT_DTYPE_TESTS = ["tests/test_train.py"]  # what a run does, not its digits: fit for bf16
TWO_GPU_TESTS = ["tests/test_fsdp.py", "tests/test_cuda_paths.py"]
DRY_TWO = ["tests/test_cuda_paths.py", "-k", "bf16_policy"]
DRY_TESTS = ["tests/test_math.py", "-k", "step0_identity or sigmoid_by_hand"]
# full size: the shape the issue names; dry: seconds on a CPU
BENCH = {"full": ["--model", "llama-3.2-1b", "--prompt-tokens", "96-128", "--response-tokens", "832-896",
                  "--num-pairs", "32", "--label-batch", "8", "--dpo-batch", "8", "--dpo-steps", "3",
                  "--sft-batch", "8", "--sft-steps", "3"],
         "dry": ["--model", "tiny", "--tasks", "dpo", "--prompt-tokens", "8-16", "--response-tokens", "8-24",
                 "--num-pairs", "8", "--label-batch", "4", "--dpo-batch", "2", "--dpo-steps", "1"]}
SMALL_LAUNCH = {"PREPARE_ARGS": "--num-pairs 200 --num-test 12", "SFT_ARGS": "--max-steps 2 --eval-pairs 0",
                "DPO_ARGS": "--max-steps 2 --eval-pairs 0", "EVAL_ARGS": "--max-new-tokens 8 --batch-size 12"}
DPO_RESUME = ["--max-steps", "6", "--batch-size", "8", "--save-every", "2", "--lora-dropout", "0.2", "--lr", "1e-2",
              "--eval-pairs", "0"]
# seconds per step at full size: 9 minutes in all; the dry mode's steps are short but CPUs are slow
TIMEOUT = {"full": {"a": 160, "b": 140, "c": 50, "d": 180, "e": 30, "f": 120}, "dry": {k: 300 for k in STEPS}}


class Step:
    """One step's outcome: ok (True/False), its figure, and what the table shows; skipped: not run here (not a
    failure)."""

    def __init__(self, name: str, ok: bool, figure: str, skipped: bool = False):
        self.name, self.ok, self.figure, self.skipped = name, ok, figure, skipped

    def verdict(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"

    def line(self) -> str:
        return f"{self.verdict()} {self.name} {self.figure}"


def run(cmd: list[str], log: str, timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run cmd in the project's root, its output to `log`; (exit status or None when it timed out, output)."""
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                               env=dict(os.environ, **(env or {})))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = None
    with open(log) as f:
        return rc, f.read()


def failed(rc: int | None, out: str, timeout: float) -> str:
    if rc is None:
        return f"timed out after {timeout:.0f} s"
    tail = [x for x in out.strip().splitlines() if x.strip()][-1:] or ["no output"]
    return f"exit {rc}: {tail[0][:200]}"


# ---------------------------------------------------------------------------------------------------------
# the results tables (step b)

ROW = re.compile(r"^\|\s*([^|]+?)\s*\|\s*(-?[\d.]+)\s*±\s*([\d.]+)\s*\|")


def results_table(text: str) -> dict[str, tuple[float, float]]:
    """policy -> (mean, SE) from the first `| policy | gold reward (mean ± SE) | ...` table in a markdown text."""
    out, inside = {}, False
    for line in text.splitlines():
        if line.startswith("| policy | gold reward"):
            inside = True
        elif inside and not line.startswith("|"):
            break
        elif inside and (m := ROW.match(line)):
            out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out


def compare_tables(cpu: dict, gpu: dict, k: float = 3.0) -> tuple[bool, str]:
    """Every policy of the CPU table within k combined standard errors in this run's (the GPU's): (ok, figure)."""
    if not cpu or not gpu:
        return False, f"no results table ({'CPU table' if not cpu else 'this run'})"
    missing = sorted(set(cpu) - set(gpu))
    if missing:
        return False, f"policies missing in this run's table: {', '.join(missing)}"
    zs = {p: abs(gpu[p][0] - m) / max((se ** 2 + gpu[p][1] ** 2) ** 0.5, 1e-12) for p, (m, se) in cpu.items()}
    worst = max(zs, key=zs.get)
    return all(z <= k for z in zs.values()), (f"largest gap to the CPU table {zs[worst]:.2f} combined SE ({worst}: "
                                             f"{gpu[worst][0]:.3f} vs {cpu[worst][0]:.3f}; limit {k:g})")


# ---------------------------------------------------------------------------------------------------------
# the steps

def pytest_step(name: str, tests: list[str], log: str, limit: float, env: dict) -> tuple[bool, str]:
    """Run pytest on `tests` under env: (ok, its summary line and the seconds)."""
    t0 = time.time()
    rc, out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], log, limit, env)
    if rc is None:
        return False, failed(rc, out, limit)
    summary = [x for x in out.splitlines() if re.search(r"\d+ (passed|failed|error)", x)][-1:] or [""]
    return rc == 0, f"{summary[0].strip('= ')} ({time.time() - t0:.0f} s)"


def step_a(args, work: str) -> Step:
    tests = args.tests.split() if args.tests else (DRY_TESTS if args.dry else METHOD_TESTS)
    env = {"WLT_TEST_DEVICE": "cpu" if args.dry else "cuda"}
    ok, fig = pytest_step("a", tests, os.path.join(work, "a_tests.log"), TIMEOUT[args.size]["a"], env)
    fig = f"{fig} on {env['WLT_TEST_DEVICE']}"
    if not args.tests and not args.dry:  # the scripts in their own default dtype too: bf16 autocast on CUDA
        ok2, fig2 = pytest_step("a", DEFAULT_DTYPE_TESTS, os.path.join(work, "a_default_dtype.log"),
                                TIMEOUT[args.size]["a"], dict(env, WLT_TEST_SCRIPT_DTYPE="default"))
        ok, fig = ok and ok2, f"{fig}; scripts in their default dtype: {fig2}"
    return Step("a", ok, fig)


def step_b(args, work: str) -> Step:
    run_dir = os.path.join(work, "run")
    env = {"RUN": run_dir, "PYTHON": sys.executable, **(SMALL_LAUNCH if args.dry else {})}
    t0 = time.time()
    rc, out = run(["bash", os.path.join(ROOT, "launch.sh")], os.path.join(work, "b_launch.log"),
                  TIMEOUT[args.size]["b"], env)
    if rc != 0:
        return Step("b", False, failed(rc, out, TIMEOUT[args.size]["b"]))
    with open(os.path.join(run_dir, "eval", "results.md")) as f:
        gpu = results_table(f.read())
    with open(args.cpu_table) as f:
        cpu = results_table(f.read())
    ok, fig = compare_tables(cpu, gpu)
    fig += f", launch.sh {time.time() - t0:.0f} s"
    if args.dry:  # a tiny world's table is not the README's: the comparison is shown, not judged
        return Step("b", bool(gpu), fig + " (dry: not judged)")
    return Step("b", ok, fig)


def prepared_run(args, work: str) -> str:
    """A synthetic run folder with the teacher's base model: step b's, --run-dir's, or a small new one."""
    for d in (args.run_dir, os.path.join(work, "run")):
        if d and os.path.isfile(os.path.join(d, "models", "teacher-base", "config.json")):
            return d
    d = os.path.join(work, "run")
    rc, out = run([sys.executable, "wlt.py", "prepare", "--data", "synthetic", "--out", d, "--num-pairs", "200",
                   "--num-test", "12"], os.path.join(work, "c_prepare.log"), 120)
    if rc != 0:
        raise RuntimeError(f"prepare: {failed(rc, out, 120)}")
    return d


def same_weights(a: str, b: str) -> tuple[bool, str]:
    """Every tensor of two finished runs' weight files bit-equal: (ok, figure)."""
    import torch
    from safetensors.torch import load_file
    n, worst, where = 0, 0.0, ""
    for name in ("model.safetensors", os.path.join("adapter", "adapter_model.safetensors")):
        x, y = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        if x.keys() != y.keys():
            return False, f"{name}: different tensors"
        for k in x:
            n += 1
            if not torch.equal(x[k], y[k]):
                d = float((x[k].float() - y[k].float()).abs().max())
                if d >= worst:
                    worst, where = d, k
    if where:
        return False, f"not bit-equal: max |diff| {worst:.3g} ({where})"
    return True, f"bit-equal ({n} tensors)"


def step_c(args, work: str) -> Step:
    try:
        run_dir = prepared_run(args, work)
    except RuntimeError as e:
        return Step("c", False, str(e))
    dpo = os.path.join(ROOT, "train_dpo.py")
    common = ["--model", os.path.join(run_dir, "models", "teacher-base"),
              "--data", os.path.join(run_dir, "data", "labeled.jsonl"), *DPO_RESUME]
    full, cut = os.path.join(work, "c_full"), os.path.join(work, "c_cut")
    # cuBLAS picks its reduction order per workspace: a fixed workspace makes reruns reproducible (and is what
    # deterministic algorithms require of it)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    limit = TIMEOUT[args.size]["c"]
    inject = os.path.join(ROOT, "tests", "inject.py")
    rc, out = run([sys.executable, inject, "deterministic", dpo, *common, "--out", full],
                  os.path.join(work, "c_full.log"), limit, env)
    if rc != 0:
        return Step("c", False, "uninterrupted run: " + failed(rc, out, limit))
    rc, out = run([sys.executable, inject, "deterministic,step:5", dpo, *common, "--out", cut],
                  os.path.join(work, "c_killed.log"), limit, env)
    if rc != -signal.SIGKILL:
        return Step("c", False, f"the run to kill was not killed (exit {rc})")
    rc, out = run([sys.executable, inject, "deterministic", dpo, *common, "--out", cut, "--resume"],
                  os.path.join(work, "c_resumed.log"), limit, env)
    if rc != 0 or "resumed from" not in out:
        return Step("c", False, "resumed run: " + (failed(rc, out, limit) if rc != 0 else "did not resume"))
    ok, fig = same_weights(full, cut)
    return Step("c", ok, "killed before step 5, resumed from step 4: " + fig)


def step_d(args, work: str) -> Step:
    bench_json = os.path.join(work, "bench.json")
    cmd = [sys.executable, os.path.join(ROOT, "extras", "bench.py"), *BENCH[args.size], "--keep-going",
           "--json", bench_json]
    limit = TIMEOUT[args.size]["d"]
    rc, out = run(cmd, os.path.join(work, "d_bench.log"), limit)
    if rc not in (0, 3) or not os.path.isfile(bench_json):
        return Step("d", False, failed(rc, out, limit))
    with open(bench_json) as f:
        res = json.load(f)
    parts, bad = [], []
    for task, key, name, faster in (("label", "pairs_per_s", "label", lambda b, w: w / b),
                                    ("dpo", "step_seconds", "DPO step", lambda b, w: b / w),
                                    ("sft", "tokens_per_s", "SFT", lambda b, w: w / b)):
        if task not in res:
            continue
        r = res[task]
        failed_sides = [side for side in ("baseline", "wlt") if "error" in r[side]]
        if failed_sides:
            bad.append(f"{task} {'/'.join(failed_sides)} failed: {r[failed_sides[0]]['error'][:120]}")
            continue
        parts.append(f"{name} {faster(r['baseline'][key], r['wlt'][key]):.2f}x")
        if r["same_numbers"].startswith("DIFFER"):
            bad.append(f"{task} sides differ")
    if "dpo" in res and "peak_total" in res["dpo"]["wlt"] and not args.dry:
        parts.append(f"DPO peak {res['dpo']['wlt']['peak_total'] / 2 ** 30:.2f} GiB (wlt, weights included)")
    fig = ", ".join(parts) + " (wlt vs baseline)" + (f"; {'; '.join(bad)}" if bad else "")
    return Step("d", rc == 0, fig)


def step_e(args, work: str) -> Step:
    bench_json = os.path.join(work, "bench.json")
    if not os.path.isfile(bench_json):
        return Step("e", False, "no bench.json: step d did not run")
    with open(bench_json) as f:
        res = json.load(f)
    if "dpo" not in res:
        return Step("e", False, "step d ran no DPO")
    est, measured = estimate_vs_measured(res, work, whole=not args.dry)
    ratio = est / max(measured, 1)
    unit, scale = ("GiB", 2 ** 30) if est > 2 ** 30 else ("MiB", 2 ** 20)
    fig = f"estimate {est / scale:.3g} {unit} vs measured {measured / scale:.3g} {unit} ({ratio:.2f}x)"
    if args.dry:
        return Step("e", True, fig + ", both without the weights (dry: not judged)")
    return Step("e", abs(ratio - 1) <= 0.2, fig + ", limit 20%")


def estimate_vs_measured(res: dict, work: str, whole: bool = True) -> tuple[float, float]:
    """`wlt.py estimate`'s peak for bench.py's DPO run (its shape, LoRA rank 8, its batch as one micro-batch,
    prompt + response at their longest, its dtype) and the measured one, bytes. whole: the device's peak,
    weights included; else what the steps added above the loaded weights (on a CPU the process's memory also
    holds the libraries). The estimate is the command's own function; the command that prints it, with the
    shape's config.json, goes to e_estimate.log."""
    from transformers import AutoConfig
    from bench import SHAPES
    from lib import files
    from lib.estimate import estimate_memory
    a, mine = res["args"], res["dpo"]["wlt"]
    if "error" in mine:
        raise RuntimeError(f"bench's DPO run failed: {mine['error'][:150]}")
    shape = dict(SHAPES[a["model"]])
    cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
    max_len = a["prompt_tokens"][1] + a["response_tokens"][1] + 1
    est = estimate_memory(cfg, 1, 8, a["dpo_batch"], max_len, "dpo", res["dtype"])["bytes"]
    files.write_json(os.path.join(work, "e_config.json"), SHAPES[a["model"]])
    files.write_text(os.path.join(work, "e_estimate.log"), "\n".join([
        f"python wlt.py estimate --model {os.path.join(work, 'e_config.json')} --kind dpo --lora-rank 8 "
        f"--micro-batch-size {a['dpo_batch']} --max-len {max_len} --dtype {res['dtype']}",
        *(f"{k}: {v / 2 ** 20:.1f} MiB" for k, v in est.items()),
        f"measured (bench.py, wlt's DPO): {mine['peak_total'] / 2 ** 20:.1f} MiB in all, "
        f"{mine['peak'] / 2 ** 20:.1f} MiB above the loaded weights", ""]))
    if whole:
        return est["total"], mine["peak_total"]
    return est["total"] - est["weights"], mine["peak"]


def step_f(args, work: str) -> Step:
    import torch
    if not args.dry and torch.cuda.device_count() < 2:
        return Step("f", True, f"{torch.cuda.device_count()} GPU: 2 processes need 2", skipped=True)
    env = {"WLT_TEST_DEVICE": "cpu" if args.dry else "cuda"}
    ok, fig = pytest_step("f", DRY_TWO if args.dry else TWO_GPU_TESTS, os.path.join(work, "f_two_processes.log"),
                          TIMEOUT[args.size]["f"], env)
    return Step("f", ok, f"2 processes ({'gloo' if args.dry else 'nccl'}): {fig}")


RUNNERS = {"a": step_a, "b": step_b, "c": step_c, "d": step_d, "e": step_e, "f": step_f}


def main():
    from lib.console import HelpFormatter

    class Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):  # the steps as written; defaults once
        pass
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (the default where CUDA is not available)")
    ap.add_argument("--steps", default=STEPS, help="which steps to run, e.g. 'ab' or 'a,c,d,e'")
    ap.add_argument("--out", default=None, help="folder for the steps' logs and outputs (default: a new temporary "
                                                "folder, kept and named at the end); must not exist yet")
    ap.add_argument("--cpu-table", default=None, help="markdown file whose first results table is the CPU one that step "
                                                      "b compares with (default: the project's README.md)")
    ap.add_argument("--run-dir", default=None, help="a prepared synthetic run step c may use when b did not run")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply every step's time limit (full size: "
                         + ", ".join(f"{k} {v} s" for k, v in TIMEOUT["full"].items()) + ")")
    ap.add_argument("--tests", default=None, help="step a's pytest arguments, space-separated (default: the method's tests)")
    args = ap.parse_args()
    steps = [s for s in args.steps if s in STEPS]
    if not steps or any(c not in STEPS + ", " for c in args.steps):
        ap.error(f"--steps {args.steps!r}: letters from {STEPS}")
    args.cpu_table = args.cpu_table or os.path.join(ROOT, "README.md")
    if not os.path.isfile(args.cpu_table):
        ap.error(f"--cpu-table {args.cpu_table}: no such file")
    if not args.time_scale > 0:
        ap.error(f"--time-scale {args.time_scale}: must be > 0")
    for size in TIMEOUT.values():
        for k in size:
            size[k] *= args.time_scale
    if args.out and os.path.exists(args.out):
        ap.error(f"--out {args.out}: already exists; name a new folder")
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        args.dry = True
    args.size = "dry" if args.dry else "full"
    if args.dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every step on the CPU, also on a machine with a GPU
    work = args.out or tempfile.mkdtemp(prefix="wlt-gpu-check-")
    os.makedirs(work, exist_ok=True)
    what = "no GPU: dry mode, tiny shapes on the CPU" if not cuda else (
        "dry mode, tiny shapes on the CPU" if args.dry else f"GPU {torch.cuda.get_device_name(0)}")
    print(f"gpu_check: {what}; torch {torch.__version__}; steps {''.join(steps)}; logs in {work}", flush=True)
    results = []
    for s in steps:
        t0 = time.time()
        try:
            r = RUNNERS[s](args, work)
        except Exception as e:  # a broken step is that step's FAIL; the others still run
            r = Step(s, False, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        r.seconds = time.time() - t0
        results.append(r)
        print(r.line(), flush=True)
    print("\n| step | result | seconds | figure |\n| --- | --- | ---: | --- |")
    for r in results:
        print(f"| {r.name} | {r.verdict()} | {r.seconds:.0f} | {r.figure.replace('|', '/')} |")
    from lib import files
    files.write_json(os.path.join(work, "gpu_check.json"), {
        "machine": what, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {k: v for k, v in vars(args).items()},
        "steps": [{"step": r.name, "ok": r.ok, "skipped": r.skipped, "seconds": round(r.seconds, 1), "figure": r.figure}
                  for r in results]})
    print(f"\n{what}; logs and gpu_check.json in {work}")
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
