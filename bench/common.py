"""What the bench scripts share: the table of models they know, a Hugging Face twin holding the
same weights as ours, and interleaved timing.

Timing on a shared machine is noisy, so every comparison runs its contenders in turn
(A B A B ...), each repetition of one right after the same repetition of the other, and reports
medians; the spread of the per-repetition ratios says how far to trust the median ratio.
"""

import argparse
import importlib
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

# -----------------------------------------------------------------------------
# The models: name -> where ours lives, its transformers twin, a CPU-sized benchmark config


@dataclass(frozen=True)
class BenchModel:
    package: str  # folder holding model.py
    hf_class: str  # transformers class with the same architecture, e.g. "GPT2LMHeadModel"
    preset: str = "tiny"  # Config preset of the default run: the model train.py trains on CPU ...
    config: dict = field(default_factory=dict)  # ... with these overrides
    quick: dict = field(default_factory=dict)  # Config overrides of the --quick smoke run

    @property
    def model(self):
        return importlib.import_module(f"{self.package}.model")


# The tiny presets with a 4,096-token vocabulary: at GPT-2's 50,257 a CPU training step is ~80%
# vocabulary projection and cross-entropy, the same two kernels on both sides, and the ratio
# would say little about the model code (--set vocab_size=50257 to see it anyway).
CPU = dict(vocab_size=4096)
QUICK = dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64, intermediate_size=128)

MODELS = {
    "gpt2": BenchModel("gpt2", "GPT2LMHeadModel", config=CPU, quick=QUICK),
    "llama31": BenchModel("llama31", "LlamaForCausalLM", config=CPU, quick=dict(QUICK, n_kv_heads=2)),
    "qwen3": BenchModel("qwen3", "Qwen3ForCausalLM", config=CPU, quick=dict(QUICK, n_kv_heads=2)),
}


def add_common_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="gpt2", choices=sorted(MODELS), help="which architecture")
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run on a toy config")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Config field of the benchmark config, e.g. --set n_layer=8 (repeatable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps ratios stable on a shared machine, 0 is torch's default")
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


def parse_set(items):
    """["n_layer=8", "norm_eps=1e-6"] -> {"n_layer": 8, "norm_eps": 1e-6} (ints, floats, bools, None, str)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[key] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
    return out


def build_ours(args, preset=None, **overrides):
    """Our Transformer for args.model: the spec's preset and config (or `preset` alone), --quick's
    toy sizes, then `overrides` and --set."""
    spec = MODELS[args.model]
    base = spec.config if preset is None else {}
    overrides = {**base, **(spec.quick if args.quick else {}), **overrides, **parse_set(args.set)}
    torch.manual_seed(args.seed)
    cfg = spec.model.Config.from_preset(preset or spec.preset, **overrides)
    return spec.model.Transformer(cfg)


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
        theirs = getattr(transformers, hf_class).from_pretrained(tmp, attn_implementation=attn_implementation)
    return theirs.to(p.device, p.dtype)


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
