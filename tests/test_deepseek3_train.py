"""deepseek3/train.py: auxiliary-loss-free balancing (DeepSeek-V3 report sec. 2.1.2) and the MTP loss.
After each optimizer step every MoE router's bias moves by gamma * sign(mean load - load), the load summed
over the step's micro-batches and the data-parallel ranks, so replicas never drift; the MTP loss is logged
and falls on Shakespeare; a resumed run restores the biases."""

import math
import os
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from registry import by_name
from train_helpers import losses, metrics, run_in_process, run_ranks, train_args

SPEC = by_name("deepseek3")
STEPS = 4
# a hundred times the report's 0.001, so that in a few steps the biases change which experts are picked
FAST_BIAS = "--set=bias_update_speed=0.1"


def router_biases(model):
    """(MoE layers, n_experts): the router biases of the main MoE layers, then the MTP block's, whole
    (gathered where FSDP shards them)."""
    blocks = [*model.layers, *(mtp.block for mtp in model.mtp)]
    biases = [block.mlp.router.bias for block in blocks if hasattr(block.mlp, "router")]
    return torch.stack([b.full_tensor() if isinstance(b, DTensor) else b for b in biases]).detach().cpu()


@pytest.fixture
def record_biases(monkeypatch):
    """Each rank saves the router biases it holds after every step into <out_dir>/biases_rank<R>.pt."""
    import deepseek3.train as train

    class Recording(train.TrainingExtras):
        def __init__(self, model, args, device):
            super().__init__(model, args, device)
            self.path = Path(args.out_dir) / f"biases_rank{os.environ.get('RANK', 0)}.pt"
            self.history = []

        def after_step(self, model):
            super().after_step(model)
            self.history.append(router_biases(model))
            torch.save(self.history, self.path)

    monkeypatch.setattr(train, "TrainingExtras", Recording)


def saved_biases(out_dir, rank=0):
    return torch.load(Path(out_dir) / f"biases_rank{rank}.pt")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_biases_stay_identical_on_every_rank_and_equal_one_process(parallel, record_biases, toy_data, tmp_path):
    """2 gloo ranks with one micro-batch each = one process with both micro-batches: the same losses
    and, after every step, the same biases on both ranks as in the single process."""
    args = train_args(SPEC, toy_data, tmp_path / "single", "--max-steps", STEPS, FAST_BIAS)
    single = run_in_process(SPEC, *args, "--total-batch-tokens", 2 * 4 * 16)
    args = train_args(SPEC, toy_data, tmp_path / parallel, "--max-steps", STEPS, FAST_BIAS)
    run_ranks(SPEC, *args, "--parallel", parallel)
    expected = saved_biases(tmp_path / "single")
    assert expected[-1].shape[0] == 2 and expected[-1].abs().sum(-1).min() > 0  # both routers' biases moved
    for rank in range(2):
        assert [torch.equal(a, b) for a, b in zip(saved_biases(tmp_path / parallel, rank), expected)] == [True] * STEPS
    assert losses(metrics(tmp_path / parallel)) == pytest.approx(losses(single), abs=1e-5)


def test_bias_moves_by_gamma_toward_the_underloaded_experts():
    """Two micro-batches' loads are summed, then each bias moves by exactly gamma * sign(mean - load):
    up for an expert below the mean, down above it, not at all at the mean."""
    from deepseek3.train import TrainingExtras

    gamma = 0.25  # a power of two: the expected biases are exact
    model = SPEC.build(bias_update_speed=gamma, n_layer=3).train()  # MoE layers 1 and 2, and the MTP block
    extras = TrainingExtras(model, None, torch.device("cpu"))
    routers = [block.mlp.router for block in [*model.layers, model.mtp[0].block] if hasattr(block.mlp, "router")]
    n_experts = model.cfg.n_experts
    with torch.no_grad():
        for router in routers:
            router.bias.copy_(torch.arange(n_experts) / 8)
    before = router_biases(model)
    total = torch.randint(0, 9, (len(routers), n_experts)).float()  # tokens per expert over the step
    total[-1] = 3.0
    total[-1, :2] = torch.tensor([1.0, 5.0])  # mean 3: expert 0 under, expert 1 over, the rest at the mean
    first = torch.floor(total * torch.rand(total.shape))  # split over two micro-batches
    loads = [first, total - first]
    for load in loads:
        extras.after_forward({"expert_load": load})
    extras.after_step(model)
    expected = before + gamma * torch.sign(total.mean(-1, keepdim=True) - total)
    assert torch.equal(router_biases(model), expected)
    assert (router_biases(model) - before)[-1, :2].tolist() == [gamma, -gamma]
    assert torch.equal(router_biases(model)[-1, 2:], before[-1, 2:])
    assert extras.step_load.sum() == 0  # the next step counts afresh


def test_mtp_router_bias_moves_by_gamma_toward_its_underloaded_experts():
    """The MTP block's MoE layer is balanced as the main ones: over a few steps of two micro-batches each,
    its bias moves by exactly gamma * sign(mean - load), the load being what its router picked. A step
    whose only forward skips the MTP block (one token, nothing after next to predict) leaves its bias."""
    from deepseek3.train import TrainingExtras

    gamma = 0.25  # a power of two: the expected biases are exact
    model = SPEC.build(bias_update_speed=gamma).train()
    extras = TrainingExtras(model, None, torch.device("cpu"))
    mtp_router = model.mtp[0].block.mlp.router
    assert extras.moe_layers[-1].router is mtp_router  # its row is the last
    picks = []
    mtp_router.register_forward_hook(lambda router, inputs, out: picks.append(out[1]))
    generator = torch.Generator().manual_seed(4)
    for step in range(3):
        before, picks = mtp_router.bias.clone(), []
        for _micro in range(2):
            idx = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=generator)
            aux = {}
            model(idx, idx, aux=aux)
            extras.after_forward(aux)
        extras.after_step(model)
        load = torch.bincount(torch.cat(picks).flatten(), minlength=model.cfg.n_experts).float()
        assert torch.equal(mtp_router.bias, before + gamma * torch.sign(load.mean() - load)), step
    assert mtp_router.bias.abs().sum() > 0
    before, main_before = mtp_router.bias.clone(), router_biases(model)[0]
    aux = {}
    model(idx[:, :1], idx[:, :1], aux=aux)
    assert aux["expert_load"].shape[0] == 1  # the main MoE layer's row only
    extras.after_forward(aux)
    extras.after_step(model)
    assert torch.equal(mtp_router.bias, before) and not torch.equal(router_biases(model)[0], main_before)


def test_router_biases_are_left_out_of_adamw():
    """The biases take no gradient and AdamW never holds them: only TrainingExtras moves them."""
    from deepseek3.train import make_optimizer

    model = SPEC.build()
    args = Namespace(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.95)
    held = {id(p) for group in make_optimizer(model, args, torch.device("cpu")).param_groups for p in group["params"]}
    biases = [m.router.bias for m in model.modules() if hasattr(m, "router")]  # the MTP block's too
    assert len(biases) == 2 and not any(id(b) in held for b in biases)
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_mtp_loss_is_finite_and_falls_on_shakespeare(tmp_path):
    """A short run of the default set-up (tiny preset, bundled Shakespeare; 16 steps of 4 x 32 tokens): the
    logged MTP loss (the cross-entropy of the token after next, report sec. 2.2) is finite and falls."""
    rows = run_in_process(
        SPEC,
        *["--out-dir", tmp_path, "--max-steps", 16, "--seq-len", 32, "--warmup-steps", 4, "--log-every", 4],
        *["--eval-every", 0, "--eval-steps", 1, "--sample-tokens", 0],
    )
    mtp = [r["mtp_loss"] for r in rows if "mtp_loss" in r]  # each the mean over 4 steps
    assert len(mtp) == 4 and all(map(math.isfinite, mtp)), mtp
    assert mtp[-1] < mtp[0] - 1.0, mtp  # measured: 10.6 -> 7.5


def test_resume_restores_the_biases(record_biases, toy_data, tmp_path):
    """--stop-after then --resume ends with the biases (and losses) of the uninterrupted run."""
    whole = run_in_process(SPEC, *train_args(SPEC, toy_data, tmp_path / "whole", "--max-steps", 6, FAST_BIAS))
    args = train_args(SPEC, toy_data, tmp_path / "split", "--max-steps", 6, FAST_BIAS)
    first = run_in_process(SPEC, *args, "--stop-after", 3)
    second = run_in_process(SPEC, *args, "--resume")
    assert losses(first) + losses(second) == losses(whole)
    assert torch.equal(saved_biases(tmp_path / "split")[-1], saved_biases(tmp_path / "whole")[-1])
    assert saved_biases(tmp_path / "whole")[-1].abs().sum() > 0


def test_fsdp_in_bf16_routes_by_fp32_biases(monkeypatch, toy_data, tmp_path):
    """FSDP gathers the weights in bf16, but each biased router as a group of its own in fp32: a bf16 copy of
    the bias would round away its steps of gamma. Each rank records the dtypes its routers compute with."""
    import deepseek3.train as train

    class Probe(train.TrainingExtras):
        def __init__(self, model, args, device):
            super().__init__(model, args, device)
            path = Path(args.out_dir) / f"router_dtypes_rank{os.environ['RANK']}.txt"

            def record(router, inputs):  # runs after FSDP's own pre-forward hook, which gathers the router
                path.write_text(str(router.bias.dtype))

            for moe in self.moe_layers:
                moe.router.register_forward_pre_hook(record)

    monkeypatch.setattr(train, "TrainingExtras", Probe)
    args = train_args(SPEC, toy_data, tmp_path, "--max-steps", 1, "--dtype", "bfloat16", "--parallel", "fsdp")
    run_ranks(SPEC, *args)
    assert [(tmp_path / f"router_dtypes_rank{r}.txt").read_text() for r in range(2)] == ["torch.float32"] * 2
