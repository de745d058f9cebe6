"""Data parallelism on CPU with 2 gloo ranks under torchrun: DDP and FSDP2 give the losses of a
single process that sees the same global batch, and an FSDP checkpoint resumes (also on a
different number of ranks, through torch.distributed.checkpoint's resharding)."""

import pytest

from registry import MODELS
from train_helpers import losses, metrics, run_in_process, run_ranks, run_torchrun, train_args

models = pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
STEPS, GLOBAL_BATCH = 4, 2 * 4 * 16  # 2 ranks x batch 4 x seq 16


def single_process_losses(spec, data, out_dir):
    # one process, two accumulated micro-batches = two ranks with one each
    args = train_args(spec, data, out_dir, "--max-steps", STEPS, "--total-batch-tokens", GLOBAL_BATCH)
    return losses(run_in_process(spec, *args))


@models
def test_ddp_matches_single_process(spec, toy_data, tmp_path):
    expected = single_process_losses(spec, toy_data, tmp_path / "single")
    run_ranks(spec, *train_args(spec, toy_data, tmp_path / "ddp", "--max-steps", STEPS), "--parallel", "ddp")
    assert losses(metrics(tmp_path / "ddp")) == pytest.approx(expected, abs=1e-5)


def test_torchrun_launch(toy_data, tmp_path):
    """The command line a user types: torchrun --nproc_per_node 2 gpt2/train.py --parallel ddp."""
    spec = MODELS[0]
    expected = single_process_losses(spec, toy_data, tmp_path / "single")
    run_torchrun(spec, *train_args(spec, toy_data, tmp_path / "ddp", "--max-steps", STEPS), "--parallel", "ddp")
    assert losses(metrics(tmp_path / "ddp")) == pytest.approx(expected, abs=1e-5)


@models
def test_fsdp_matches_single_process_and_resumes_on_another_world_size(spec, toy_data, tmp_path):
    """2 ranks train half the steps and checkpoint; 1 rank resumes the sharded checkpoint."""
    expected = single_process_losses(spec, toy_data, tmp_path / "single")
    args = train_args(spec, toy_data, tmp_path / "fsdp", "--max-steps", STEPS, "--total-batch-tokens", GLOBAL_BATCH)
    run_ranks(
        spec, *args, "--parallel", "fsdp", "--stop-after", STEPS // 2, "--sample-tokens", 4, "--prompt", "!"
    )  # every rank samples: FSDP gathers in each forward
    assert (tmp_path / "fsdp" / "ckpt_dcp" / "meta.pt").exists()
    run_ranks(spec, *args, "--parallel", "fsdp", "--resume", nproc=1)
    assert losses(metrics(tmp_path / "fsdp")) == pytest.approx(expected, abs=1e-5)
