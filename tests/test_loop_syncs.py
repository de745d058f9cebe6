"""The training loop never makes the host wait for the device except on the steps that may (issue #22):
log, eval and checkpoint steps and the last one. Each step's loss and gradient norm stay on the device
(infra.StepFigures) until such a step reads them all at once, so a non-finite one is found there, and
never after a checkpoint holding its weights was written.

Counted on CPU by tests/sync_counter.py through the real train(): what a CUDA run would sync on.
The optimizer step and the loader are left out of the count: on CUDA the AdamW is fused (no read of
its step counter, which torch's reference AdamW keeps on the CPU and reads), and batches come from host
memory."""

import contextlib

import pytest
import torch

from registry import MODELS, by_name
from sync_counter import HostSyncCounter
from train_helpers import metrics, run_in_process, train_args

STEPS, LOG_EVERY = 6, 3


class StepSyncs(HostSyncCounter):
    """Host syncs per training step: a step runs from one batch fetch to the next (one micro-batch per
    step here). The loader and optimizer.step run uncounted (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.per_step, self.paused = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def new_step(self):
        self.per_step.append(len(self.ops))

    def counts(self):
        marks = [*self.per_step, len(self.ops)]
        return [b - a for a, b in zip(marks, marks[1:])]

    @contextlib.contextmanager
    def uncounted(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def count_syncs(spec, monkeypatch, *args):
    """Run spec's train.py with args; returns the host syncs of each step."""
    syncs = StepSyncs()
    prefetcher, make_optimizer = spec.train.Prefetcher, spec.train.make_optimizer

    class CountedBatches(prefetcher):
        def next_batch(self):
            syncs.new_step()
            with syncs.uncounted():
                return super().next_batch()

    def counted_optimizer(*a):
        optimizer = make_optimizer(*a)
        step = optimizer.step

        def uncounted_step(*args, **kwargs):
            with syncs.uncounted():
                return step(*args, **kwargs)

        optimizer.step = uncounted_step
        return optimizer

    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):  # a read that, on the CPU, reaches no aten op the dispatch mode could see
        if not syncs.paused:
            syncs.ops.append("Tensor.tolist")
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(spec.train, "Prefetcher", CountedBatches)
    monkeypatch.setattr(spec.train, "make_optimizer", counted_optimizer)
    with syncs:
        run_in_process(spec, *args)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return syncs.counts()[:STEPS]  # the last count runs on past the loop: the final forward and sample


@pytest.mark.parametrize("spec", [MODELS[0], by_name("qwen3_moe"), by_name("kimi_k2")], ids=lambda s: s.name)
def test_only_log_steps_wait_for_the_device(spec, toy_data, tmp_path, monkeypatch):
    args = train_args(spec, toy_data, tmp_path, "--max-steps", STEPS, "--log-every", LOG_EVERY)
    counts = count_syncs(spec, monkeypatch, *args)
    log_steps = [i for i in range(STEPS) if (i + 1) % LOG_EVERY == 0]
    assert [i for i, n in enumerate(counts) if n] == log_steps, counts
    rows = [row for row in metrics(tmp_path) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # every step's row, written on log steps


def test_a_read_in_the_loop_is_caught(toy_data, tmp_path, monkeypatch):
    """The counter sees an .item() slipped into every step (here: the learning rate read from a tensor)."""
    spec = MODELS[0]
    lr_at = spec.train.lr_at
    monkeypatch.setattr(spec.train, "lr_at", lambda step, args: torch.tensor(lr_at(step, args)).item())
    args = train_args(spec, toy_data, tmp_path, "--max-steps", STEPS, "--log-every", LOG_EVERY)
    assert all(count_syncs(spec, monkeypatch, *args)), "an .item() per step went unseen"


def test_a_non_finite_step_between_logs_never_reaches_a_checkpoint(toy_data, tmp_path, monkeypatch):
    """A nan loss at step 7, which reads nothing, is updated with (nan weights from then on) and found at
    step 9's read, a checkpoint step: the run stops naming step 7, step 9's checkpoint is never written, the
    one kept is step 6's (finite), and training resumes from it."""
    spec = MODELS[0]
    args = train_args(spec, toy_data, tmp_path, "--max-steps", 10, "--log-every", 5, "--ckpt-every", 3)
    model_class = spec.model.Transformer
    forward, calls = model_class.forward, []

    def nan_on_the_eighth_forward(self, *a, **kw):
        logits, loss = forward(self, *a, **kw)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) == 8 else loss

    monkeypatch.setattr(model_class, "forward", nan_on_the_eighth_forward)
    with pytest.raises(SystemExit, match=r"loss is nan at step 7: stopping .* last good checkpoint .*\(step 6\)$"):
        run_in_process(spec, *args)
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert kept["meta"]["step"] == 6 and all(torch.isfinite(v).all() for v in kept["model"].values())
    assert [row["step"] for row in metrics(tmp_path)] == list(range(1, 7))
    monkeypatch.setattr(model_class, "forward", forward)
    resumed = run_in_process(spec, *args, "--resume")
    assert [row["step"] for row in resumed if "loss" in row] == list(range(7, 11))
