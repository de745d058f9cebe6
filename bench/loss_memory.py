"""Peak memory of the training loss: the plain F.cross_entropy over the full logits against the
chunked lm_head + cross-entropy every model.py uses (linear_cross_entropy, one byte-identical copy
per model), forward and backward, in one process. Issue 9's target: the loss's extra peak memory
at most 1/4 of the full fp32 logits at V = 128,256 and T = 4,096.

    uv run python -m bench.loss_memory                       # CPU: V 128,256, 1 x 4,096 tokens, n_embd 1,024
    uv run python -m bench.loss_memory --n-embd 4096         # Llama 3.1 8B's width (about 12 GB of RAM)
    uv run python -m bench.loss_memory --device cuda --dtype bfloat16 --batch-size 2

What is measured: the peak memory during loss + backward above the memory held when it starts
(the hidden states, the lm_head weight, the targets), less the two gradients any implementation
returns (x.grad and weight.grad), which are not the loss's working memory. On CUDA that is
torch.cuda.max_memory_allocated. On CPU it is the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) above its resident set at the start, with glibc's malloc told to
mmap every block of 64 KiB or more, so a freed tensor leaves the resident set at once: it counts
every allocation, a kernel's internal temporaries included, to within a few MB of allocator and
thread-stack noise. The chunked path allocates both gradients as its backward starts, so they are
alive at its peak; the plain path's may appear only after its peak, so its figure is, if anything,
too low (at n_embd 4,096: 1.97x the fp32 logits, against 2.75x at 1,024). --dtype bfloat16 gives x and
the weight in bf16, as FSDP's mixed precision gathers them; autocast would add a bf16 copy of the
weight and of its gradient to both sides alike, and its cast-back fp32 gradient appears only after
the peak, so subtracting it would undercount.
"""

import argparse
import ctypes
import gc

import torch
import torch.nn.functional as F

from gpt2.model import LOSS_CHUNK_ELEMENTS, linear_cross_entropy, loss_chunk_rows

TARGET = 0.25  # chunked loss's extra peak <= this fraction of the full fp32 logits
MB = 1e6


def plain_loss(x, weight, targets):
    return F.cross_entropy(F.linear(x, weight).float().flatten(0, -2), targets.flatten(), ignore_index=-100)


def read_status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


class CPUMemory:
    """Peak resident memory of this process since start(), above what was resident then."""

    def __init__(self):
        M_MMAP_THRESHOLD = -3  # glibc mallopt parameter; fixing it also stops glibc raising it on free
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)

    def start(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        self.base = read_status("VmRSS")

    def peak(self):
        return read_status("VmHWM") - self.base


class CUDAMemory:
    def start(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak(self):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def measure(fn, x, weight, targets, memory):
    """(loss, weight gradient, extra peak bytes) of fn's forward + backward."""
    x.grad = weight.grad = None
    gc.collect()
    memory.start()
    loss = fn(x, weight, targets)
    loss.backward()
    extra = memory.peak() - x.grad.nbytes - weight.grad.nbytes
    return loss.item(), weight.grad, extra


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=128_256, help="V (default: Llama 3's)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--n-embd", type=int, default=1024, help="hidden width; the logits' size does not depend on it")
    p.add_argument("--chunk-rows", type=int, help="rows per chunk (default: model.py's loss_chunk_rows)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="of x and the weight")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a toy size, in a second: checks the script runs (its MB are allocator noise)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.vocab_size, args.seq_len, args.batch_size, args.n_embd = 1000, 64, 2, 32
        args.chunk_rows = args.chunk_rows or 16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory = CUDAMemory() if device.type == "cuda" else CPUMemory()
    chunk_rows = args.chunk_rows or loss_chunk_rows(args.vocab_size)

    g = torch.Generator(device=device).manual_seed(0)
    B, T, V, D = args.batch_size, args.seq_len, args.vocab_size, args.n_embd
    dtype = getattr(torch, args.dtype)
    x = torch.randn(B, T, D, generator=g, device=device).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(V, D, generator=g, device=device)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g, device=device)
    logits_fp32 = B * T * V * 4
    print(
        f"loss memory: V {V:,}, {B} x {T:,} tokens, n_embd {D:,}, {args.dtype}, {device}; chunks of {chunk_rows} rows"
    )
    print(f"full fp32 logits (B*T x V x 4 bytes): {logits_fp32 / MB:,.1f} MB")
    # what a model's forward runs at this size: logits that fit in one chunk are not chunked
    whole = B * T * V <= LOSS_CHUNK_ELEMENTS
    print(f"model.py's loss at this size: {'one F.cross_entropy (fits one chunk)' if whole else 'chunked'}")
    print(f"extra peak memory of loss + backward, less the gradients returned ({memory.__class__.__name__}):")

    for fn in (plain_loss, linear_cross_entropy):  # warm-up: one-time set-up costs count for neither
        fn(x[:, :8], weight, targets[:, :8]).backward()
    loss_p, grad_p, extra_p = measure(plain_loss, x, weight, targets, memory)
    grad_p = grad_p.clone()
    print(f"  plain   F.cross_entropy(F.linear(x, w).float()): {extra_p / MB:>9,.1f} MB = {extra_p / logits_fp32:.2f}x")

    def chunked(*a):
        return linear_cross_entropy(*a, chunk_rows=chunk_rows)

    loss_c, grad_c, extra_c = measure(chunked, x, weight, targets, memory)
    print(f"  chunked linear_cross_entropy:                    {extra_c / MB:>9,.1f} MB = {extra_c / logits_fp32:.2f}x")
    print(
        f"chunked / plain: {extra_c / extra_p:.3f}; target chunked <= {TARGET}x the fp32 logits: "
        f"{'met' if extra_c <= TARGET * logits_fp32 else 'NOT met'}"
    )
    rel = ((grad_c - grad_p).norm() / grad_p.norm()).item()
    print(
        f"losses: plain {loss_p:.6f}, chunked {loss_c:.6f} (|diff| {abs(loss_c - loss_p):.1e}); weight grad rel diff {rel:.1e}"
    )


if __name__ == "__main__":
    main()
