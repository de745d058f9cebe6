"""Training on CPU: the loss drops, a resumed run continues bit-for-bit, checkpoints load without
pickle, a non-finite loss stops the run and keeps the last good checkpoint, and sampling works."""

import subprocess
import sys

import pytest
import torch

from registry import MODELS
from train_helpers import ROOT, losses, run_in_process, train_args

models = pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)


@models
def test_training_lowers_the_loss(spec, toy_data, tmp_path):
    rows = run_in_process(spec, *train_args(spec, toy_data, tmp_path, "--max-steps", 30, "--lr", "1e-2"))
    loss = losses(rows)
    assert len(loss) == 30
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert sum(loss[-5:]) / 5 < loss[0] - 1.5, loss
    assert val[-1] < loss[0] - 1.5


@models
def test_resume_continues_bit_for_bit(spec, toy_data, tmp_path):
    whole = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "whole", "--max-steps", 6))
    args = train_args(spec, toy_data, tmp_path / "split", "--max-steps", 6)
    first = run_in_process(spec, *args, "--stop-after", 3)
    second = run_in_process(spec, *args, "--resume")
    assert losses(first) + losses(second) == losses(whole)  # exactly equal, not approximately
    assert [r["lr"] for r in first + second if "lr" in r] == [r["lr"] for r in whole if "lr" in r]


@models
def test_checkpoint_loads_without_pickle(spec, toy_data, tmp_path):
    run_in_process(spec, *train_args(spec, toy_data, tmp_path, "--max-steps", 2))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # refuses arbitrary pickled code
    assert set(state) == {"model", "optim", "meta"}
    assert state["meta"]["step"] == 2 and set(state["meta"]["loader"]) == {"shard", "pos"}
    assert not any(k.startswith("_orig_mod") for k in state["model"])
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file behind


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy_data, tmp_path):
    spec = MODELS[0]
    args = train_args(spec, toy_data, tmp_path, "--max-steps", 10, "--ckpt-every", 1)
    run_in_process(spec, *args, "--stop-after", 2)
    good = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at step \d+: stopping .* last good checkpoint"):
        run_in_process(spec, *args, "--resume", "--lr", "1e12", "--grad-clip", "0")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["meta"]["step"] >= 2
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"].values())
    assert len(good) > 0


def test_generate_from_checkpoint(toy_data, tmp_path, capsys):
    spec = MODELS[0]
    args = train_args(spec, toy_data, tmp_path, "--max-steps", 2)
    run_in_process(spec, *args)
    capsys.readouterr()
    run_in_process(spec, *args, "--generate", "--prompt", "!", "--sample-tokens", 5)
    out = capsys.readouterr().out
    assert "loaded" in out and out.count("-" * 80) == 2


@models
def test_train_script_runs_from_the_repo_root(spec):
    """`python <model>/train.py --help` works as a plain script: no sys.path tricks needed."""
    done = subprocess.run([sys.executable, f"{spec.package}/train.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--parallel" in done.stdout and "--resume" in done.stdout


def test_bad_override_is_a_clear_error(toy_data, tmp_path):
    spec = MODELS[0]
    with pytest.raises(SystemExit, match="--set 'n_layers=2': expected FIELD=VALUE with FIELD one of"):
        run_in_process(spec, *train_args(spec, toy_data, tmp_path), "--set", "n_layers=2")
    with pytest.raises(SystemExit, match="'two' is not a valid"):
        run_in_process(spec, *train_args(spec, toy_data, tmp_path), "--set", "n_layer=two")
