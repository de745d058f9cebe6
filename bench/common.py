"""What the bench scripts share: the models they know (shared/models.py, the one table for
tests and benchmarks), a Hugging Face twin holding the same weights as ours, and interleaved
timing.

Timing on a shared machine is noisy, so every comparison runs its contenders in turn
(A B A B ...), each repetition of one right after the same repetition of the other, and reports
medians; the spread of the per-repetition ratios says how far to trust the median ratio.
"""

import argparse
import statistics
import tempfile
import time

import torch

from shared.models import MODELS, by_name, hf_from_pretrained, randomize_

# -----------------------------------------------------------------------------
# Arguments, our model, its transformers twin


def add_common_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="gpt2", choices=[m.name for m in MODELS], help="which architecture")
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run on a toy config")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a Config field of the benchmark config, e.g. --set n_layer=8 (repeatable)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 keeps ratios stable on a shared machine, 0 is torch's default",
    )
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    parser.add_argument("--seed", type=int, default=0)


def add_comparison_args(parser: argparse.ArgumentParser, repeats: int, what: str):
    """Arguments of the benchmarks that time our model against its transformers twin."""
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed {what} per model (after a warm-up)")
    parser.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"), help="transformers' attention")


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def build_ours(args, preset=None, **overrides):
    """Our Transformer for args.model: the registry's bench preset and config (or `preset` alone),
    --quick's toy sizes, then `overrides` and --set (parsed by the model's train.py, as its --set is).

    Its weights are random with std 0.1 (shared.models.randomize_), not the training init: speed does
    not depend on them, but the checks printed beside the timings do. On the init's tiny weights a
    model barely depends on position or context (greedy decoding mostly repeats the last token,
    through the tied embedding), so even a decoding bug would leave "tokens match: yes"."""
    spec = by_name(args.model)
    base = spec.bench_config if preset is None else {}
    try:
        overrides = {
            **base,
            **(spec.bench_quick if args.quick else {}),
            **overrides,
            **spec.infra.parse_overrides(args.set),
        }
        cfg = spec.model.Config.from_preset(preset or spec.bench_preset, **overrides)
    except ValueError as e:  # a bad --set or a Config check: one line, no traceback
        raise SystemExit(str(e)) from None
    torch.manual_seed(args.seed)
    return randomize_(spec.model.Transformer(cfg), seed=args.seed)


def ours_and_twin(args, device):
    """Our model for args (build_ours) on device, and its transformers twin holding the same weights."""
    ours = build_ours(args).to(device)
    return ours, hf_twin(ours, by_name(args.model).hf_class, args.hf_attn)


def hf_twin(ours, hf_class, attn_implementation="sdpa"):
    """The transformers model holding exactly our weights: ours.save_pretrained -> from_pretrained."""
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("this benchmark compares against transformers: `uv sync` installs it (dev group)") from e
    transformers.logging.set_verbosity_error()  # token-id and rope range notes about toy configs
    transformers.utils.logging.disable_progress_bar()
    p = next(ours.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = hf_from_pretrained(hf_class, tmp, attn_implementation=attn_implementation)  # kimi_k2's too
    return theirs.to(p.device, p.dtype)


def summary(args, model):
    """'gpt2: 1,234 params (2 layers, n_embd 64, vocab 512)', with the preset if args names one."""
    cfg, preset = model.cfg, getattr(args, "preset", None)
    return (
        f"{args.model}{' ' + preset if preset else ''}: {model.num_params():,} params ({cfg.n_layer} layers, "
        f"n_embd {cfg.n_embd}, vocab {cfg.vocab_size})"
    )


def placement(model, device):
    """'torch.float32 cpu, 1 thread(s)' or 'torch.bfloat16 cuda'."""
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    return f"{next(model.parameters()).dtype} {device.type}{threads}"


# -----------------------------------------------------------------------------
# Timing


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, warmup: int = 1, device="cpu"):
    """Seconds per call of each fn in fns, run in turn: A B A B ... after `warmup` rounds."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def ratio_spread(slow, fast):
    """Quartiles of the per-repetition ratios slow[i] / fast[i]: the noise of the median ratio."""
    return quartiles([s / f for s, f in zip(slow, fast)])


def report_ratio(label, times_ours, times_theirs, target=None):
    """Print 'label: 1.23x (per-repetition ratios p25 1.18x .. p75 1.27x), target >= 1.2x: met'."""
    ratio = statistics.median(times_theirs) / statistics.median(times_ours)
    q1, _, q3 = ratio_spread(times_theirs, times_ours)
    line = f"{label}: {ratio:.2f}x (per-repetition ratios p25 {q1:.2f}x .. p75 {q3:.2f}x)"
    if target is not None:
        line += f", target >= {target}x: {'met' if ratio >= target else 'not met'}"
    print(line)
    return ratio
