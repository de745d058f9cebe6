"""One GPU's check of train.py: a few bf16 steps of every model's real presets under --compile (the
whole forward compiled, as build_model does), printing train.py's memory estimate (its start-up
"memory per process (estimate)" line) beside the peak CUDA memory the run really allocated, and its
tokens/s and MFU over warm steps only (the last log line: steps 11-15, long after compilation); then
torch.profiler's table of the top CUDA kernels of one compiled GPT-2 124M micro-batch. Nothing is
asserted; the lead runs it on a lent GPU.

    python -m bench.gpu_check                   # all runs below and the kernel table, ~5 minutes on an H100
    python -m bench.gpu_check --only gpt2       # the runs whose name starts with gpt2
    python -m bench.gpu_check --no-profile      # without the kernel table
"""

import argparse
import contextlib
import importlib
import io
import re
import shutil
import tempfile
import time

import torch

# (name, package, train.py arguments): bf16 autocast, one process, --compile; --max-steps small, no sample
RUNS = [
    ("gpt2 124M", "gpt2", "--preset gpt2 --batch-size 16 --seq-len 1024"),
    ("llama32_1b", "llama31", "--preset llama32_1b --batch-size 4 --seq-len 2048"),
    ("qwen3_0_6b", "qwen3", "--preset qwen3_0_6b --batch-size 4 --seq-len 2048"),
    ("qwen3_0_6b act. ckpt", "qwen3", "--preset qwen3_0_6b --batch-size 8 --seq-len 2048 --activation-checkpointing"),
    # the 30B-A3B's MoE layers (128 experts, 8 per token, grouped matmuls) with 2 layers and GPT-2's vocabulary
    (
        "qwen3_30b_a3b 2 layers",
        "qwen3",
        "--preset qwen3_30b_a3b --set n_layer=2 --set vocab_size=50304 --batch-size 4 --seq-len 2048",
    ),
    # DeepSeek-V3 16B's layers (MLA, 64 experts of which 6 per token, 2 shared, MTP), one dense and two MoE
    (
        "deepseek_v3_16b 3 layers",
        "deepseek3",
        "--preset deepseek_v3_16b --set n_layer=3 --set vocab_size=50304 --batch-size 4 --seq-len 2048",
    ),
    # K2's widths (n_embd 7168, 64 heads of MLA) with 16 of its 384 experts, one dense and one MoE layer; MuonClip
    (
        "kimi_k2 2 layers, 16 experts",
        "kimi_k2",
        "--preset kimi_k2 --set n_layer=2 --set n_experts=16 --set vocab_size=50304 --batch-size 2 --seq-len 2048",
    ),
]
# one micro-batch per step (a preset's published recipe would accumulate to millions of tokens)
COMMON = (
    "--compile --max-steps 15 --warmup-steps 2 --log-every 5 --eval-every 0 --eval-steps 2 --sample-tokens 0 "
    "--dtype bfloat16"
)
GIB = 2**30


def run(package, arguments, device_type="cuda"):
    """<package>/train.py's main on these arguments, into a scratch --out-dir -> (its printed output, peak
    CUDA bytes allocated or None off CUDA, seconds)."""
    train = importlib.import_module(f"{package}.train")
    out_dir = tempfile.mkdtemp(prefix="gpu_check_")
    if device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    printed = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed):
            train.main(f"{arguments} --out-dir {out_dir}".split())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    peak = torch.cuda.max_memory_allocated() if device_type == "cuda" else None
    return printed.getvalue(), peak, time.perf_counter() - t0


def estimate_gib(text):
    match = re.search(r"memory per process \(estimate\): (.*) = ([\d.]+) (GiB|MiB)", text)
    if not match:
        return None, ""
    total = float(match.group(2)) / (1 if match.group(3) == "GiB" else 1024)
    return total, match.group(1)


def last_speed(text):
    lines = [line for line in text.splitlines() if "tok/s" in line]
    if not lines:
        return "-"
    match = re.search(r"([\d,]+) tok/s(?: \| MFU ([\d.]+)%)?", lines[-1])
    return f"{match.group(1)} tok/s" + (f", MFU {match.group(2)}%" if match.group(2) else "")


def arguments_of(arguments):
    """The run's train.py arguments with COMMON, and one micro-batch per step."""
    batch, seq = (int(re.search(rf"--{name} (\d+)", arguments).group(1)) for name in ("batch-size", "seq-len"))
    return f"{arguments} {COMMON} --total-batch-tokens {batch * seq}"


def kernel_table(rows=15, batch_size=16, seq_len=1024):
    """torch.profiler's top CUDA kernels, by their own time, of one GPT-2 124M micro-batch (forward with the
    loss, backward) compiled as train.py --compile compiles it, under bf16 autocast, after two warm-up ones."""
    from torch.profiler import ProfilerActivity, profile

    from gpt2.model import Config, Transformer

    cfg = Config.from_preset("gpt2")
    model = Transformer(cfg).cuda().train()
    model.compile(fullgraph=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device="cuda")

    def micro_batch():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:], aux={})[1]
        loss.backward()

    for _ in range(2):
        micro_batch()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        micro_batch()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run only the runs whose name starts with this")
    p.add_argument("--no-profile", action="store_true", help="skip the kernel table of a GPT-2 micro-batch")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    rows = []
    for name, package, arguments in RUNS:
        if not name.startswith(args.only):
            continue
        try:
            text, peak, seconds = run(package, arguments_of(arguments))
        except Exception as e:  # one failing run must not hide the others' figures
            rows.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | | | |")
            print(rows[-1], flush=True)
            continue
        total, terms = estimate_gib(text)
        ratio = f"{total * GIB / peak:.2f}x" if total else "-"
        rows.append(f"| {name} | {total:.1f} GiB ({terms}) | {peak / GIB:.1f} GiB | {ratio} | {last_speed(text)} |")
        print(rows[-1], f"({seconds:.0f} s)", flush=True)
    print("\n| run | estimate | peak allocated | estimate / peak | speed, steps 11-15 |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if not args.no_profile:
        print("\ntop CUDA kernels of one GPT-2 124M micro-batch (16 x 1024 tokens, bf16, compiled):")
        print(kernel_table())


if __name__ == "__main__":
    main()
