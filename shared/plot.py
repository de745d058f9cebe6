"""Loss curves: train and validation loss of one or several runs, drawn from their metrics.jsonl.

    python -m shared.plot out/gpt2                      # -> out/gpt2/loss.png
    python -m shared.plot out/gpt2 out/llama31 -o compare.png --log-y
    python -m shared.plot out/a/metrics.jsonl out/b --x tokens --labels baseline wider

A training run (train.py) calls write_loss_plot(out_dir) after each evaluation, so its out-dir
holds loss.png, redrawn from the whole metrics.jsonl each time.

metrics.jsonl, one JSON object per line, written by train.py's main process in step order:
- a train row after every optimizer step:
    step    optimizer steps done, counting this one (1, 2, ...)
    loss    that step's training loss: the mean cross-entropy over its micro-batches and processes,
            computed before the update
    lr      the learning rate the update used
    tokens  (when present) training tokens consumed up to and including this step
  and, on logging steps (every --log-every and the last), the model's own figures since the
  previous logging step, averaged over the processes:
    aux_loss                   MoE load-balancing loss (qwen3 MoE, deepseek3, kimi_k2)
    mtp_loss                   multi-token-prediction loss (deepseek3, kimi_k2 with MTP layers)
    expert_load_max_over_mean  tokens routed to the busiest expert over the mean, in the most
                               unbalanced MoE layer (1.0 is even)
    max_attention_logit        largest pre-softmax attention logit of any head, before QK-Clip (kimi_k2)
- an eval row after every --eval-every steps and the last step:
    step      as above, the train row of the same step precedes it
    val_loss  mean loss over --eval-steps validation batches (the same batches at every eval)
A resumed run first drops the rows past its checkpoint's step, then appends, so steps only grow.
A killed run can leave its last line cut short: the reader here skips such a line.

matplotlib is imported inside the functions, so importing this module (and --help) stays fast.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path


def read_metrics(path):
    """(train_rows, val_rows) of a metrics.jsonl: rows with `loss`, rows with `val_loss`; other rows
    are left out. An unreadable last line (a write cut short) is skipped; any other is an error."""
    lines = Path(path).read_text().splitlines()
    train, val = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON row: {line[:80]!r}") from None
        if "loss" in row:
            train.append(row)
        if "val_loss" in row:
            val.append(row)
    return train, val


def metrics_file(run):
    """A run's out-dir, or its metrics.jsonl itself -> the metrics.jsonl path."""
    run = Path(run)
    return run / "metrics.jsonl" if run.is_dir() else run


def curve(rows, x, key):
    """(xs, ys) of the rows that carry both x and key."""
    points = [(row[x], row[key]) for row in rows if x in row and key in row]
    return [p[0] for p in points], [p[1] for p in points]


def draw(runs, x="step", log_y=False):
    """A matplotlib Figure of runs, {label: (train_rows, val_rows)}: per run one colour, train loss as
    a thin line, validation loss as markers on a line."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure state

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, (train, val)) in enumerate(runs.items()):
        if not any(x in row for row in train + val):
            raise ValueError(f"{label}: no row has a {x!r} field to plot against")
        colour = f"C{i % 10}"
        ax.plot(*curve(train, x, "loss"), color=colour, linewidth=0.8, alpha=0.7, label=f"{label} train")
        ax.plot(*curve(val, x, "val_loss"), color=colour, marker="o", markersize=4, label=f"{label} val")
    ax.set_xlabel("tokens" if x == "tokens" else "optimizer step")
    if x == "step" and len(runs) == 1:  # one run whose rows count tokens: a tokens scale on top too
        train = next(iter(runs.values()))[0]
        last = next((row for row in reversed(train) if "tokens" in row and row["step"]), None)
        if last:
            per_step = last["tokens"] / last["step"]  # the batch is fixed, so tokens grow linearly
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
            top.set_xlabel("tokens")
    ax.set_ylabel("loss (cross-entropy, nats per token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_runs(metrics_paths, out_png, labels=None, x="step", log_y=False):
    """Draw the runs' metrics.jsonl (or out-dirs) into out_png, written atomically; returns its Path.
    labels default to the runs' folder names."""
    paths = [metrics_file(p) for p in metrics_paths]
    labels = labels or [p.parent.name or str(p) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    fig = draw({label: read_metrics(p) for label, p in zip(labels, paths)}, x=x, log_y=log_y)
    out_png = Path(out_png)
    # a temp file beside the target, then a rename: a reader never sees a half-written PNG
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".tmp", dir=out_png.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, out_png)
    except BaseException:
        os.unlink(tmp)
        raise
    return out_png


def write_loss_plot(out_dir):
    """train.py's hook: out_dir/loss.png from out_dir/metrics.jsonl, against step; returns its Path."""
    return plot_runs([Path(out_dir) / "metrics.jsonl"], Path(out_dir) / "loss.png")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m shared.plot",
        description="Draw train and validation loss of one or several runs side by side, from their metrics.jsonl.",
    )
    parser.add_argument("runs", nargs="+", help="run out-dirs or metrics.jsonl files")
    parser.add_argument(
        "-o", "--out", help="the PNG to write (default: loss.png in the run's folder for one run, else ./compare.png)"
    )
    parser.add_argument(
        "--x", choices=("step", "tokens"), default="step", help="the horizontal axis (tokens: rows need a tokens field)"
    )
    parser.add_argument("--labels", nargs="+", help="one legend name per run (default: the runs' folder names)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    args = parser.parse_args(argv)
    out = args.out or (metrics_file(args.runs[0]).parent / "loss.png" if len(args.runs) == 1 else "compare.png")
    try:
        print(plot_runs(args.runs, out, labels=args.labels, x=args.x, log_y=args.log_y))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
