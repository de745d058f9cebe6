"""DeepSeek-V3 (deepseek3/) on one GPU, checked once by hand: bf16 training steps through train.py,
cached decoding against the full forward in bf16, and bench/mla.py's cache table and decode speeds.
Nothing is asserted; every check prints a line, and one summary table closes the run.

    PYTHONPATH=. python3 bench/gpu_check_deepseek3.py                 # on an H100: under 4 minutes
    uv run python -m bench.gpu_check_deepseek3 --device cpu --quick   # the same checks, toy sizes, on CPU

1. train.py, 15 bf16 steps each: the tiny preset eager and under --compile, tiny_moe, and deepseek_v3_16b's
   layers (MLA with the kernel's 512 + 64 latent, 64 experts of which 6 per token, 2 shared) cut to 3
   layers with GPT-2's vocabulary, both compiled: last logged loss, tokens/s and MFU over the warm steps
   11-15 (the last log line), peak CUDA memory allocated beside train.py's own memory estimate.
2. Decoding with the latent cache (the weight-absorbed form; FlashMLA's kernel when it is installed
   and the GPU is SM90) against the full forward (the expanded form), both bf16, each compared with
   the fp32 full forward: a wrong cache shows as an error far above bf16's own.
3. bench/mla.py: KV-cache bytes per token against GQA models, and the absorbed against the naive
   decoding speed on the same weights.
"""

import argparse
import contextlib
import io
import re
import time
import traceback

import torch

from bench import gpu_check, mla
from bench.gpu_check import estimate_gib, last_speed
from shared.models import by_name, randomize_

GIB = 2**30

# (name, train.py arguments); the 16B cut keeps one dense layer and two MoE layers
TRAIN_RUNS = [
    ("tiny", "--preset tiny --batch-size 8 --seq-len 256"),
    ("tiny --compile", "--preset tiny --batch-size 8 --seq-len 256 --compile"),
    ("tiny_moe --compile", "--preset tiny_moe --batch-size 8 --seq-len 256 --compile"),
    (
        "deepseek_v3_16b, 3 layers, --compile",
        "--preset deepseek_v3_16b --set n_layer=3 --set vocab_size=50304 --batch-size 4 --seq-len 2048 --compile",
    ),
]
QUICK_TRAIN_RUNS = [  # --quick: toy sizes that run on a CPU in seconds
    ("tiny, 2 layers", "--preset tiny --set n_layer=2 --batch-size 2 --seq-len 32"),
    ("tiny_moe, 2 layers", "--preset tiny_moe --set n_layer=2 --batch-size 2 --seq-len 32"),
]
DENSE_2_LAYERS = dict(n_layer=2, first_k_dense_replace=2)
STEPS = "--max-steps 15 --warmup-steps 2 --log-every 5 --eval-every 0 --eval-steps 2 --sample-tokens 0"
QUICK_STEPS = "--max-steps 4 --warmup-steps 1 --log-every 2 --eval-every 0 --eval-steps 1 --sample-tokens 0"


def train_run(arguments, device):
    """deepseek3/train.py's main on these arguments -> (printed output, peak CUDA bytes or None, seconds).
    One micro-batch per step (--total-batch-tokens), whatever the preset's published recipe says."""
    batch, seq = (int(re.search(rf"--{name} (\d+)", arguments).group(1)) for name in ("batch-size", "seq-len"))
    extra = f"--total-batch-tokens {batch * seq} --device {device.type} --dtype bfloat16"
    return gpu_check.run("deepseek3", f"{arguments} {extra}", device.type)


def last_loss(text):
    losses = re.findall(r"step +\d+ \| loss ([\d.]+|nan|inf)", text)
    return losses[-1] if losses else "-"


def failed(check, error):
    """The summary row of a check that raised, after its traceback (printed for whoever reads the log)."""
    traceback.print_exc()
    row = f"| {check} | failed: {type(error).__name__}: {str(error)[:200]} |"
    print(row, flush=True)
    return row


def check_training(runs, steps, device):
    rows = []
    for name, arguments in runs:
        try:
            text, peak, seconds = train_run(f"{arguments} {steps}", device)
        except Exception as e:  # one failing run must not hide the others' figures
            rows.append(failed(f"train: {name}", e))
            continue
        total, _ = estimate_gib(text)
        memory = f"estimate {total:.2f} GiB" if total is not None else "no estimate"
        if peak:
            memory += f", peak allocated {peak / GIB:.2f} GiB" + (f" (x{total * GIB / peak:.2f})" if total else "")
        rows.append(f"| train: {name} | loss {last_loss(text)}, {last_speed(text)}, {memory}, {seconds:.0f} s |")
        print(rows[-1], flush=True)
    return rows


def check_decode(preset, overrides, device, prompt_len, new_tokens, seed=0):
    """Logits of a cached prefill + one-token steps against the full forward, both bf16, each measured
    against the fp32 full forward: (max |error| of the cached path, of the full bf16 path, path name)."""
    spec = by_name("deepseek3")
    cfg = spec.model.Config.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    # weights of std 1/sqrt(n_embd): unit-scale activations at any width, logits far from flat
    model = randomize_(spec.model.Transformer(cfg), seed=seed, std=cfg.n_embd**-0.5).to(device).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, prompt_len + new_tokens), device=device)
    with torch.inference_mode():
        reference = model(idx)[0].float()  # (B, T, vocab) fp32, expanded form
        model.to(torch.bfloat16)
        full = model(idx)[0].float()
        cache = model.make_cache(idx.size(0), idx.size(1))
        steps = [model(idx[:, :prompt_len], cache=cache, pos=0)[0]]
        for t in range(prompt_len, idx.size(1)):
            steps.append(model(idx[:, t : t + 1], cache=cache, pos=t)[0])
        cached = torch.cat(steps, dim=1).float()
    path = mla.attention_path(model, cache)
    return (cached - reference).abs().max().item(), (full - reference).abs().max().item(), path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="'cuda' (the check) or 'cpu' (to try the script)")
    p.add_argument("--quick", action="store_true", help="toy sizes: seconds on a CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check_deepseek3 needs a CUDA GPU (or --device cpu --quick to try it)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where} | torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()

    rows = check_training(QUICK_TRAIN_RUNS if args.quick else TRAIN_RUNS, QUICK_STEPS if args.quick else STEPS, device)

    # the 16B's attention (n_head 16, the kernel's 512 + 64 latent) in 2 dense layers (bf16 would flip near-tied
    # expert choices, in both paths), or the registry's toy config
    preset, overrides = ("tiny", by_name("deepseek3").small) if args.quick else ("deepseek_v3_16b", DENSE_2_LAYERS)
    overrides = {**overrides, "vocab_size": 4096}
    prompt_len, new_tokens = (8, 8) if args.quick else (512, 32)
    try:
        cached, full, path = check_decode(preset, overrides, device, prompt_len, new_tokens)
        verdict = "ok" if cached <= 2 * full + 1e-3 else "TOO LARGE: the cached path is wrong"
        rows.append(
            f"| decode == forward, bf16, {path} attention | largest logit error against fp32: cached {cached:.3g}, "
            f"full forward {full:.3g}: {verdict} |"
        )
        print(rows[-1], flush=True)
    except Exception as e:
        rows.append(failed("decode == forward, bf16", e))

    bench_args = ["--device", device.type, "--dtype", "bfloat16"] + (["--quick"] if args.quick else mla.GPU_ARGS)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            mla.main(bench_args)
        print(printed.getvalue())
        for line in printed.getvalue().splitlines():
            if line.startswith(mla.SUMMARY_PREFIXES):
                cell = line.replace("|", "\\|")  # a bare | would end the table cell
                rows.append(f"| bench/mla.py | {cell} |")
    except Exception as e:
        print(printed.getvalue())
        rows.append(failed(f"bench/mla.py {' '.join(bench_args)}", e))

    print(f"\nsummary ({where}, {time.perf_counter() - t0:.0f} s)\n| check | result |\n|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
