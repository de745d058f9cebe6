"""DDP with gradient accumulation: 2 gloo ranks accumulating 2 micro-batches each must end the step with
the gradients of one process that accumulates the same 4 micro-batches. The losses-only DDP tests in
test_distributed.py run one micro-batch per rank, so a loop that all-reduced the wrong micro-batch
(say the first instead of the last) would pass them; these gradients, compared before any optimizer
step, would not."""

import contextlib
import importlib
import os
from pathlib import Path

import pytest
import torch

from registry import MODELS
from train_helpers import run_in_process, run_ranks, train_args

# a dense model, and a mixture of experts with multi-token prediction and a router bias
models = pytest.mark.parametrize("spec", [s for s in MODELS if s.name in ("gpt2", "deepseek3")], ids=lambda s: s.name)
BATCH, SEQ = 2, 16
# 2 ranks x 2 micro-batches, or 1 process x 4: the same 4 chunks of the token stream, as DataLoader
# strides rank r to chunk r of each world_size-wide read
GLOBAL_BATCH_TOKENS = 4 * BATCH * SEQ


def capture_first_step_gradients(spec, out_dir, monkeypatch):
    """Make train.py's optimizer save {name: gradient} to out_dir/grads_rank<RANK>.pt just before its first
    step. Patched before the ranks fork, so each rank inherits it."""
    make_optimizer = spec.train.make_optimizer

    def make_recording_optimizer(model, args, device):
        optimizer = make_optimizer(model, args, device)
        path = Path(out_dir) / f"grads_rank{os.environ.get('RANK', '0')}.pt"

        def save_gradients(optimizer, args, kwargs):
            if not path.exists():  # the first step only
                grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(grads, path)

        optimizer.register_step_pre_hook(save_gradients)
        return optimizer

    monkeypatch.setattr(spec.train, "make_optimizer", make_recording_optimizer)


def gradient_sync_modules(spec):
    """The modules holding set_gradient_sync: train.py, and <pkg>/infra.py once it moves there."""
    modules = [spec.train]
    with contextlib.suppress(ModuleNotFoundError):
        modules.append(importlib.import_module(f"{spec.package}.infra"))
    return [m for m in modules if hasattr(m, "set_gradient_sync")]


def sync_first_micro_batch_only(spec, monkeypatch):
    """The bug this file guards against: with 2 micro-batches, inverting `enabled` all-reduces the first
    micro-batch and leaves the last one's gradients local to each rank."""
    modules = gradient_sync_modules(spec)
    assert modules, f"{spec.package}: no set_gradient_sync to break"
    real = modules[0].set_gradient_sync
    for module in modules:
        monkeypatch.setattr(
            module, "set_gradient_sync", lambda wrapped, args, enabled: real(wrapped, args, not enabled)
        )


def first_step_gradients(spec, data_dir, out_dir, monkeypatch, nproc):
    """Each process's gradients before its first optimizer step, from the real train.py main()."""
    capture_first_step_gradients(spec, out_dir, monkeypatch)
    # one step, unclipped (grad-clip 0): the accumulated gradient itself, not rescaled by its norm
    args = train_args(spec, data_dir, out_dir, "--batch-size", BATCH, "--seq-len", SEQ, "--max-steps", 1)
    args += ["--total-batch-tokens", GLOBAL_BATCH_TOKENS, "--grad-clip", 0]
    if nproc == 1:
        run_in_process(spec, *args)
    else:
        run_ranks(spec, *args, "--parallel", "ddp", nproc=nproc)
    return [torch.load(Path(out_dir) / f"grads_rank{rank}.pt") for rank in range(nproc)]


def assert_same_gradients(actual, expected):
    # fp32 on CPU; only the order of the sums differs (4 micro-batches vs 2 x all-reduce of 2), which
    # moves gradients by ~5% of this tolerance; the bug below moves them by ~10^5 times it.
    # On dicts assert_close also checks the names, and a failure names the parameter.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


@pytest.fixture
def single_process_gradients(spec, toy_data, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # the DDP run patches make_optimizer afresh
        (grads,) = first_step_gradients(spec, toy_data, tmp_path / "single", patch, nproc=1)
    return grads


@models
def test_ddp_accumulated_gradients_match_single_process(
    spec, single_process_gradients, toy_data, tmp_path, monkeypatch
):
    for rank_grads in first_step_gradients(spec, toy_data, tmp_path / "ddp", monkeypatch, nproc=2):
        assert_same_gradients(rank_grads, single_process_gradients)


@models
def test_syncing_only_the_first_micro_batch_is_caught(spec, single_process_gradients, toy_data, tmp_path, monkeypatch):
    """The comparison above bites: with the sync on the wrong micro-batch, no rank has the right gradients."""
    sync_first_micro_batch_only(spec, monkeypatch)
    for rank_grads in first_step_gradients(spec, toy_data, tmp_path / "ddp", monkeypatch, nproc=2):
        with pytest.raises(AssertionError):
            assert_same_gradients(rank_grads, single_process_gradients)
