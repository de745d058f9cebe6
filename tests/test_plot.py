"""shared/plot.py: metrics.jsonl rows are read as train.py writes them (a cut-short last line
skipped), drawn (the figure's lines hold the rows' values), and written as a PNG by the function
and by the command."""

import json
import subprocess
import sys

import pytest

from shared.plot import draw, main, plot_runs, read_metrics, write_loss_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, losses, val_every=2, tokens_per_step=None, cut_short=True):
    """A metrics.jsonl as train.py writes it: a train row per step, an eval row every val_every steps."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, loss in enumerate(losses, 1):
        row = dict(step=step, loss=loss, lr=1e-3)
        if tokens_per_step:
            row["tokens"] = step * tokens_per_step
        lines.append(json.dumps(row))
        if step % val_every == 0:
            lines.append(json.dumps(dict(step=step, val_loss=loss + 0.5)))
    text = "\n".join(lines) + "\n" + ('{"step": 99, "lo' if cut_short else "")  # a write cut short by a kill
    (folder / "metrics.jsonl").write_text(text)
    return folder / "metrics.jsonl"


def assert_png(path):
    assert path.exists() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000


def test_read_metrics_splits_train_and_eval_rows_and_skips_a_cut_short_last_line(tmp_path):
    path = write_run(tmp_path, [4.0, 3.0, 2.5, 2.0])
    train, val = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.0)]
    assert [(r["step"], r["val_loss"]) for r in val] == [(2, 3.5), (4, 2.5)]


def test_read_metrics_refuses_a_bad_line_that_is_not_the_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_figure_holds_each_runs_train_and_val_curves(tmp_path):
    runs = {
        "a": read_metrics(write_run(tmp_path / "a", [4.0, 3.0, 2.5, 2.0])),
        "b": read_metrics(write_run(tmp_path / "b", [5.0, 4.0, 3.0, 2.0], val_every=4)),
    }
    lines = {line.get_label(): line for line in draw(runs).axes[0].get_lines()}
    assert list(lines["a train"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["a train"].get_ydata()) == [4.0, 3.0, 2.5, 2.0]
    assert list(lines["a val"].get_xdata()) == [2, 4] and list(lines["a val"].get_ydata()) == [3.5, 2.5]
    assert list(lines["b val"].get_xdata()) == [4] and list(lines["b val"].get_ydata()) == [2.5]
    assert lines["a train"].get_color() == lines["a val"].get_color() != lines["b train"].get_color()


def test_tokens_axis_needs_rows_that_count_tokens(tmp_path):
    with_tokens = read_metrics(write_run(tmp_path / "t", [4.0, 3.0], tokens_per_step=1024))
    (line, _) = draw({"t": with_tokens}, x="tokens").axes[0].get_lines()
    assert list(line.get_xdata()) == [1024, 2048]
    with pytest.raises(ValueError, match="tokens"):
        draw({"s": read_metrics(write_run(tmp_path / "s", [4.0, 3.0]))}, x="tokens")


def test_plot_runs_writes_a_png_for_one_and_for_two_runs(tmp_path):
    a = write_run(tmp_path / "a", [4.0, 3.0, 2.5, 2.0])
    b = write_run(tmp_path / "b", [5.0, 4.0, 3.0, 2.0])
    assert write_loss_plot(tmp_path / "a") == tmp_path / "a" / "loss.png"
    assert_png(tmp_path / "a" / "loss.png")
    out = plot_runs([a, tmp_path / "b"], tmp_path / "compare.png", labels=["a", "b"], log_y=True)
    assert_png(out)
    assert b.exists() and not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed, not left


def test_command_draws_runs_side_by_side(tmp_path, capsys):
    write_run(tmp_path / "a", [4.0, 3.0, 2.5, 2.0])
    write_run(tmp_path / "b", [5.0, 4.0, 3.0, 2.0])
    main([str(tmp_path / "a")])  # one run: into its folder
    assert capsys.readouterr().out.strip() == str(tmp_path / "a" / "loss.png")
    assert_png(tmp_path / "a" / "loss.png")
    out = tmp_path / "cmp.png"
    result = subprocess.run(
        [sys.executable, "-m", "shared.plot", str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "-o", out],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert_png(out)
