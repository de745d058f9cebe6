"""The post-training files' command line, written once and importable without torch: the arguments every
method takes (each method's parse_args sets its defaults and adds its own), the checks that refuse a bad
value in one line, and run_main, which ends a run on a user's mistake with that line. A method file
parses its arguments with this module alone and only then imports torch and posttrain/common.py, so a
mistake or --help answers at once instead of after torch's import."""

import argparse
import math
import os

from posttrain.tasks import TASKS
from shared.models import MODELS

# -----------------------------------------------------------------------------
# Arguments: what every method takes; each method's parse_args sets its defaults and adds its own

SPECS = {spec.name: spec for spec in MODELS}
# RoPE learns the toy tasks' relative positions several times faster than GPT-2's learned absolute ones
DEFAULT_MODEL = "llama31"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad argument is one line, not the usage block and then the error."""
        raise SystemExit(f"{self.prog}: {message} (see --help)")


def common_parser(doc):
    """The arguments every post-training file takes; each file sets its own defaults and adds its own."""
    p = ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=36),
    )
    m = p.add_argument_group("policy")
    m.add_argument(
        "--model",
        choices=SPECS,
        help="architecture, shared/models.py's names (default: the one a post-training checkpoint records, "
        f"else {DEFAULT_MODEL})",
    )
    m.add_argument(
        "--init-from",
        metavar="PATH",
        help="a train.py or post-training out dir (its ckpt.pt), a ckpt.pt file, a Hugging Face directory "
        "(config.json), or 'none': a fresh small model",
    )
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a fresh model only: override a field of the registry's small Config, e.g. --set n_layer=4",
    )
    d = p.add_argument_group("task")
    d.add_argument("--task", default="reverse", help=f"a built-in toy task: {', '.join(TASKS)}")
    d.add_argument(
        "--data",
        help="instead of --task: prompt/completion pairs, a .jsonl or .parquet file or a hub dataset name "
        "(read with `datasets`; the last --eval-prompts rows are held out)",
    )
    d.add_argument(
        "--reward",
        default="exact",
        metavar="NAME|MODULE.FUNCTION",
        help="'exact' (1 for the answer, else 0), 'partial' (the share of the answer's words in place), or a "
        "dotted path to f(prompts, completions) -> list[float] (default: %(default)s)",
    )
    d.add_argument(
        "--tokenizer",
        help="'gpt2', 'task' (the toy tasks' word-level vocabulary), or a directory or file with tokenizer.json "
        "(default: the --init-from directory's tokenizer.json, else 'task' for a fresh model on a toy task, "
        "else 'gpt2')",
    )
    d.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts the reward is measured on")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, help="optimizer steps")
    o.add_argument("--batch-size", type=int, help="prompts per step over all processes")
    o.add_argument("--lr", type=float, help="peak learning rate (linear warmup, cosine to a tenth)")
    o.add_argument("--warmup-steps", type=int, default=10)
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, on matrices only")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0 disables)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=8, help="longest completion sampled")
    s.add_argument("--temperature", type=float, default=1.0, help="of the rollouts (evaluation is greedy)")
    s.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only (default: all)")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=50, help="steps between reward evaluations (0: end only)")
    r.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    r.add_argument("--out-dir", help="ckpt.pt, hf/ and metrics.jsonl go here")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (ignored on CUDA); 1: one reduction order anywhere"
    )
    r.add_argument(
        "--parallel",
        default="none",
        choices=("none", "ddp", "fsdp"),
        help="data parallelism under torchrun: DDP replicates the policy, FSDP2 shards it",
    )
    return p


def check_args(args, p, rules=()):
    """Refuse, up front and in one line, a value that would crash later or silently do nothing.
    Each rule is written so that nan fails it too; a file passes its own rules beside these."""
    common = [
        ("steps batch_size max_new_tokens eval_prompts log_every threads", lambda v: v >= 1, "at least 1"),
        ("top_k", lambda v: v is None or v >= 1, "at least 1"),
        ("warmup_steps eval_every", lambda v: v >= 0, "0 or more"),
        ("lr", lambda v: 0 < v < math.inf, "a positive number"),
        ("weight_decay grad_clip temperature", lambda v: 0 <= v < math.inf, "0 or more"),
    ]
    for names, ok, rule in [*common, *rules]:
        for name in names.split():
            if not ok(getattr(args, name)):
                p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {rule}")
    if args.task not in TASKS:
        p.error(f"--task {args.task!r}: choose one of {', '.join(TASKS)}")


# -----------------------------------------------------------------------------
# Main


def run_main(main):
    """main() in a method file run as a script, its result returned: a user's mistake ends the run with one
    line (SystemExit), anything else keeps its traceback."""
    try:
        return main()
    except SystemExit as e:  # a user error's one line: under torchrun, rank 0 alone prints it
        if isinstance(e.code, str) and int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(1) from None
        raise
