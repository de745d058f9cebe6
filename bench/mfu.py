"""Model FLOPs utilisation of our training step: the FLOP/s it achieves (tokens/s x the model's
`flops_per_token(seq_len)`) over the matmul peak this machine reaches, measured here.

    uv run python -m bench.mfu                        # GPT-2 tiny preset, fp32 CPU, ~30 s
    uv run python -m bench.mfu --model llama31
    uv run python -m bench.mfu --quick                # a few-second smoke run
    uv run python -m bench.mfu --device cuda --preset gpt2 --dtype bfloat16 --compile   # on a GPU

The peak is the best FLOP/s of a square GEMM at a few sizes in the step's dtype (2 n^3 FLOPs
each). Training steps then alternate with GEMMs at the best size, so a load spike on a shared
machine hits both; MFU is printed against the peak and against those alongside GEMMs. In
bfloat16 on a GPU that train.py's GPU_PEAK_TFLOPS table knows (989 TFLOP/s dense on an H100 or
H200), it is also printed against that nominal peak, the one train.py logs MFU against
(--peak-tflops gives another). bfloat16 means autocast mixed precision with fp32 weights, as
train.py does. Nothing here is asserted.
"""

import argparse
import itertools
import statistics
import time

import torch

from bench.common import add_common_args, build_ours, interleaved, quartiles, setup, summary, sync
from shared.models import by_name


def gemm(n, dtype, device, calls):
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def run():
        for _ in range(calls):
            torch.mm(a, b)

    return run, 2 * n**3 * calls


def measure_peak(sizes, dtype, device, repeats):
    """Best FLOP/s of an n x n GEMM, over sizes: {n: FLOP/s}."""
    calls = 10 if device.type == "cuda" else 1  # amortise launch and sync on a GPU
    best = {}
    for n in sizes:
        run, flops = gemm(n, dtype, device, calls)
        run()
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - t0)
        best[n] = flops / min(times)
    return best


def rate(flops_per_s):
    return f"{flops_per_s / 1e12:,.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:,.1f} GFLOP/s"


def nominal_peak(args, device, dtype):
    """(FLOP/s, label) of the hardware's nominal peak as the model's train.py reckons it (its
    peak_flops: --peak-tflops, or GPU_PEAK_TFLOPS for a known GPU in bfloat16), or (None, None)."""
    spec = by_name(args.model)
    peak = spec.train.peak_flops(args, device, dtype)
    if peak is None:
        return None, None
    if args.peak_tflops:
        return peak, f"--peak-tflops {args.peak_tflops:g}"
    return (
        peak,
        f"{torch.cuda.get_device_name(device)}, dense {args.dtype} {peak / 1e12:g} TFLOP/s, {spec.package}/train.py",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--preset", help="a Config preset (e.g. gpt2, llama32_1b) instead of the CPU benchmark config")
    parser.add_argument("--batch-size", type=int, help="default 8 on CPU, 16 on CUDA")
    parser.add_argument("--seq-len", type=int, help="default 128 on CPU, 1024 on CUDA (at most block_size)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="GEMM dtype and training compute dtype (bfloat16: autocast, fp32 weights)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--gemm-sizes", help="comma-separated n of the n x n GEMMs (default by device)")
    parser.add_argument("--repeats", type=int, default=10, help="timed training steps (and GEMMs beside them)")
    parser.add_argument("--peak-tflops", type=float, help="nominal peak of this hardware, for a second MFU")
    args = parser.parse_args(argv)
    device = setup(args)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (16 if cuda else 8)
    seq_len = args.seq_len or (1024 if cuda else 128)
    sizes = args.gemm_sizes or ("2048,4096,8192" if cuda else "256,512,1024")
    if args.quick:
        batch_size, seq_len, args.repeats, sizes = 2, 32, 3, "128,256"
    sizes = [int(n) for n in sizes.split(",")]
    dtype = getattr(torch, args.dtype)

    # --- the machine: matmul peak in this dtype
    peaks = measure_peak(sizes, dtype, device, repeats=3 if args.quick else 5)
    best_n = max(peaks, key=peaks.get)
    peak = peaks[best_n]
    threads = f", {torch.get_num_threads()} thread(s)" if not cuda else ""
    where = torch.cuda.get_device_name(device) if cuda else f"cpu{threads}"
    print(
        f"{args.dtype} GEMM on {where}: "
        + ", ".join(f"n={n} {rate(f)}" for n, f in peaks.items())
        + f"; measured peak {rate(peak)} (n={best_n})"
    )

    # --- our training step
    ours = build_ours(args, preset=args.preset).to(device).train()
    cfg = ours.cfg
    seq_len = min(seq_len, cfg.block_size)
    model = torch.compile(ours) if args.compile else ours
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda or None)
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, cfg.vocab_size, (2, batch_size, seq_len), generator=g).to(device) for _ in range(4)]
    batch = itertools.cycle(batches)

    def step():
        x, y = next(batch)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 if args.compile else 1):  # compile, then settle
        step()
    run_gemm, gemm_flops = gemm(best_n, dtype, device, calls=10 if cuda else 1)
    times = interleaved({"train": step, "gemm": run_gemm}, args.repeats, warmup=0, device=device)

    tokens = batch_size * seq_len
    q1, med, q3 = quartiles(times["train"])
    fpt = ours.flops_per_token(seq_len)
    achieved = fpt * tokens / med
    gemm_alongside = gemm_flops / statistics.median(times["gemm"])
    mode = args.dtype + (" autocast" if dtype != torch.float32 else "") + (", torch.compile" if args.compile else "")
    print(f"{summary(args, ours)}, batch {batch_size} x {seq_len} tokens, {mode}")
    print(
        f"train step: {tokens / med:,.0f} tokens/s, {1e3 * med:.1f} ms/step "
        f"(p25 {1e3 * q1:.1f} .. p75 {1e3 * q3:.1f}), median of {args.repeats}"
    )
    print(f"flops_per_token({seq_len}) = {fpt / 1e6:,.2f} MFLOP -> {rate(achieved)} achieved")
    print(
        f"MFU: {100 * achieved / peak:.1f}% of the measured peak "
        f"({100 * achieved / gemm_alongside:.1f}% of the GEMMs run alongside, {rate(gemm_alongside)})"
    )
    nominal, label = nominal_peak(args, device, dtype)
    if nominal:
        print(f"MFU: {100 * achieved / nominal:.1f}% of the nominal peak ({label})")
    return achieved / peak


if __name__ == "__main__":
    main()
