"""Training-step time of each model's tiny preset, eager against `--compile` (issue #22): a full step as
train.py runs it (forward with the loss and the aux dict, backward, gradient clipping, AdamW) on the
default run's batch (4 x 64 tokens), the model compiled as build_model compiles it (the whole forward,
fullgraph). Steps alternate eager / compiled after a warm-up that includes the compilation, and the
medians are compared; nothing is asserted.

    uv run python -m bench.compile_step                      # the five models, inductor: minutes on CPU
    uv run python -m bench.compile_step --models gpt2 qwen3 --repeats 50
    uv run python -m bench.compile_step --quick              # a smoke run: aot_eager, a few steps

Both copies start from the same weights and see the same batches; the first step's losses are printed
side by side. kimi_k2 trains with MuonClip in train.py; here every model steps with AdamW, since compile
changes the forward and backward, not the optimizer.
"""

import argparse
import os
import statistics
import time

import torch

from bench.common import interleaved, ratio_spread
from shared.models import by_name

MODELS = ("gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2")  # one per folder, each its tiny preset


def make_step(model, batches):
    """One train.py step on model: forward with the loss, backward, clip, AdamW, zero_grad."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    state = {"i": 0}

    def step():
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        _, loss = model(x, y, aux={})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def compare(name, args):
    """(eager ms/step, compiled ms/step, compile seconds, first losses) for one model's tiny preset."""
    spec = by_name(name)
    cfg = spec.model.Config.from_preset("tiny", **({"n_layer": 1} if args.quick else {}))
    torch.manual_seed(0)
    eager = spec.model.Transformer(cfg).train()
    compiled = spec.model.Transformer(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True, backend=args.backend)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g) for _ in range(4)]
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    steps = {"eager": make_step(eager, batches), "compiled": make_step(compiled, batches)}
    first = {"eager": steps["eager"]().item()}
    t0 = time.perf_counter()
    first["compiled"] = steps["compiled"]().item()  # compiles: the training graph and its backward
    compile_s = time.perf_counter() - t0
    times = interleaved(steps, args.repeats, warmup=2)
    return times, compile_s, first


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--repeats", type=int, default=30, help="timed steps of each (after two warm-up steps)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (--quick: aot_eager)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="one layer, aot_eager, 3 steps: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.backend, args.repeats = "aot_eager", 3
    if args.threads:
        torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())  # the machine's other work, which the timings share
    print(f"cpu, {torch.get_num_threads()} thread(s), load average {load}; backend {args.backend}")
    print(
        f"{'model':10} {'eager ms':>9} {'compiled ms':>12} {'speed-up':>9} {'p25..p75':>13} {'compile s':>10}  losses"
    )
    rows = {}
    for name in args.models:
        torch._dynamo.reset()
        times, compile_s, first = compare(name, args)
        eager_ms, compiled_ms = (1e3 * statistics.median(times[k]) for k in ("eager", "compiled"))
        q1, _, q3 = ratio_spread(times["eager"], times["compiled"])
        rows[name] = eager_ms / compiled_ms
        print(
            f"{name:10} {eager_ms:9.1f} {compiled_ms:12.1f} {rows[name]:8.2f}x {q1:6.2f}..{q3:.2f}x {compile_s:10.1f}"
            f"  {first['eager']:.4f} / {first['compiled']:.4f}"
        )
    return rows


if __name__ == "__main__":
    main()
