"""Everyday use of train.py (issue #21): one run per out-dir, the loss curve each run draws, the tokens in
its rows, argument mistakes reported before torch is imported (the post-training files' too), --generate
free of the training batch's checks, and the defaults a first run takes."""

import importlib
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from posttrain import sft
from registry import MODELS, by_name
from shared.data import default_corpus, hold_dir
from train_helpers import ROOT, metrics, run_in_process, train_args

SPEC = by_name("gpt2")

# --- one run per out-dir ------------------------------------------------------------------------


@pytest.fixture
def live_holder(tmp_path):
    """A process holding tmp_path/run (as a run would), until the test kills it."""
    out_dir = tmp_path / "run"
    code = "import sys, time; from shared.data import hold_dir; hold_dir(sys.argv[1]); print('held', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    yield holder, out_dir
    holder.kill()
    holder.wait()


def refusal(main, argv):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return str(stopped.value.code)


def test_a_live_run_keeps_its_out_dir_and_a_dead_ones_is_taken_over(live_holder, toy_data):
    holder, out_dir = live_holder
    args = train_args(SPEC, toy_data, out_dir, "--max-steps", 3, "--eval-every", 1)
    message = refusal(SPEC.train.main, args)
    assert message.startswith(f"{out_dir} is in use by another run (pid {holder.pid} on ") and "\n" not in message
    assert message.endswith(": wait for it or pass another --out-dir")
    assert refusal(sft.main, ["--out-dir", str(out_dir), "--init-from", "none"]) == message
    assert not (out_dir / "metrics.jsonl").exists()  # refused before anything was written

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    rows = run_in_process(SPEC, *args)  # the dead holder's lock is taken over
    assert metrics(out_dir) == rows and [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert f"pid {os.getpid()} on " in (out_dir / ".lock").read_text()


def test_a_finished_run_leaves_its_out_dir_free(toy_data, tmp_path):
    run_in_process(SPEC, *train_args(SPEC, toy_data, tmp_path, "--max-steps", 1))
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from shared.data import hold_dir; hold_dir(sys.argv[1])", str(tmp_path)],
        cwd=ROOT,
    )
    assert done.returncode == 0


# --- the loss curve and the tokens of each row ---------------------------------------------------


def test_a_run_draws_loss_png_at_each_eval_and_rows_count_tokens(toy_data, tmp_path):
    rows = run_in_process(SPEC, *train_args(SPEC, toy_data, tmp_path, "--max-steps", 2, "--eval-every", 1))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["step"], r["tokens"]) for r in rows if "loss" in r] == [(1, 4 * 16), (2, 2 * 4 * 16)]


def test_a_plot_that_fails_warns_once_and_the_run_goes_on(toy_data, tmp_path, monkeypatch, capsys):
    def broken(out_dir):
        raise OSError("disk full")

    monkeypatch.setattr(SPEC.infra, "write_loss_plot", broken)
    rows = run_in_process(SPEC, *train_args(SPEC, toy_data, tmp_path, "--max-steps", 3, "--eval-every", 1))
    assert len([r for r in rows if "val_loss" in r]) == 3
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'loss.png'} not drawn (OSError: disk full); training goes on"]


# --- argument mistakes before the heavy imports --------------------------------------------------


def run_importing(script, argv):
    """Run a script under -X importtime, which lists every module imported -> (the finished process, the
    top-level names of the modules it imported, its stderr lines other than that list)."""
    cmd = [sys.executable, "-X", "importtime", script, *argv]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    return done, imported, [line for line in lines if not line.startswith("import time:")]


@pytest.mark.parametrize("argv", [["--max-steps", "-1"], ["--help"]])
def test_arguments_are_checked_before_torch_is_imported(argv):
    """torch and the model's package must not be among the modules imported."""
    done, imported, ours = run_importing(f"{SPEC.package}/train.py", argv)
    assert imported and not imported & {"torch", SPEC.package}
    if argv == ["--help"]:
        assert done.returncode == 0 and "--max-steps" in done.stdout
    else:
        assert done.returncode == 1 and ours == ["train.py: --max-steps -1: must be at least 1 (see --help)"]


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo", "ppo"])
def test_posttrain_arguments_are_checked_before_torch_is_imported(method):
    """A post-training file parses with posttrain/cli.py alone: a mistake is one line, --help is its help,
    and neither imports torch or a model's package."""
    models = {spec.package for spec in MODELS}
    done, imported, ours = run_importing(f"posttrain/{method}.py", ["--lr", "-1"])
    assert imported and not imported & {"torch", *models}
    assert done.returncode == 1 and ours == [f"{method}.py: --lr -1.0: must be a positive number (see --help)"]
    done, imported, _ = run_importing(f"posttrain/{method}.py", ["--help"])
    assert imported and not imported & {"torch", *models}
    assert done.returncode == 0 and "--lr" in done.stdout


# --- --generate samples: the training batch is not checked ----------------------------------------


@pytest.mark.parametrize("package", sorted({spec.package for spec in MODELS}))
def test_generate_ignores_seq_len_and_batch(package):
    """Sampling reads neither --seq-len nor the batch: a --seq-len past the model's block_size, or a
    --total-batch-tokens that batch-size x seq-len does not divide, refuses training only."""
    train = importlib.import_module(f"{package}.train")
    cfg = SimpleNamespace(block_size=64)
    too_long = ["--batch-size", "2", "--seq-len", "128"]
    uneven = ["--batch-size", "2", "--seq-len", "8", "--total-batch-tokens", "1000"]
    for argv, refusal in [(too_long, "--seq-len 128 is longer than"), (uneven, "--total-batch-tokens 1000 is not")]:
        with pytest.raises(SystemExit, match=refusal):
            train.batch_tokens(train.parse_args(argv), cfg, 1)
        train.batch_tokens(train.parse_args([*argv, "--generate"]), cfg, 1)  # sampling: no refusal


def test_max_steps_below_warmup_warns_in_one_line(capsys):
    SPEC.train.parse_args(["--max-steps", "10", "--warmup-steps", "20"])
    assert capsys.readouterr().err == (
        "warning: --max-steps 10 is below --warmup-steps 20: the learning rate never reaches --lr\n"
    )
    SPEC.train.parse_args(["--max-steps", "20", "--warmup-steps", "20"])
    assert capsys.readouterr().err == ""


# --- the default run's tokenizer and baseline ----------------------------------------------------


def test_the_tokenizer_defaults_to_the_datas(toy_data, tmp_path):
    parse = SPEC.train.parse_args
    assert SPEC.infra.default_tokenizer(parse([])) == "bytes"  # the bundled corpus
    assert SPEC.infra.default_tokenizer(parse(["--data-dir", str(toy_data)])) == "gpt2"  # no prepare.json
    (tmp_path / "prepare.json").write_text(json.dumps({"tokenizer": {"name": "bytes"}}))
    assert SPEC.infra.default_tokenizer(parse(["--data-dir", str(tmp_path)])) == "bytes"


def test_the_val_loader_carries_the_unigram_baseline():
    args = SPEC.train.parse_args(["--batch-size", "2", "--seq-len", "8"])
    cfg = SPEC.infra.config_from_args(args)
    _, val_loader = SPEC.infra.data_loaders(args, cfg, 0, 1, lambda *a: None)
    assert val_loader.unigram == pytest.approx(3.3, abs=0.2)  # bytes of Shakespeare
    assert default_corpus().name == "shakespeare_bytes"


def test_kimi_k2_starts_from_a_deepseek_v3_checkpoint(tmp_path):
    by_name("deepseek3").build().save_pretrained(tmp_path)
    cfg = by_name("kimi_k2").infra.pretrained_config(str(tmp_path))
    assert cfg.n_layer == by_name("deepseek3").build().cfg.n_layer


def test_hold_dir_says_who_holds_it(tmp_path):
    lock = hold_dir(tmp_path)
    line = (tmp_path / ".lock").read_text()
    assert line.startswith(f"pid {os.getpid()} on ") and line.endswith("\n") and line.count("\n") == 1
    lock.close()
