"""train.py's memory plan (issue 9, item 7): parameter-derived terms exact, the activation estimate
within 1.5x of what a forward really saves for backward, and a run that cannot fit refused before
anything is allocated."""

from argparse import Namespace

import pytest
import torch

from registry import MODELS
from train_helpers import train_args

MODEL_IDS = [spec.name for spec in MODELS]
EVEN = dict(vocab_size=96)  # every dim 0 even, so two FSDP shards are exact halves


def plan_args(parallel="none", batch_size=2, seq_len=32, checkpointing=False):
    return Namespace(parallel=parallel, batch_size=batch_size, seq_len=seq_len, activation_checkpointing=checkpointing)


def meta_model(spec, **overrides):
    with torch.device("meta"):
        return spec.model.Transformer(spec.config(**overrides))


@pytest.mark.parametrize("spec", MODELS, ids=MODEL_IDS)
def test_parameter_terms_are_exact_and_fsdp_halves_them(spec):
    param_bytes = sum(p.numel() * p.element_size() for p in spec.build(**EVEN).parameters())  # real fp32 model
    model = meta_model(spec, **EVEN)
    single = spec.infra.memory_plan(model, plan_args(), 1, torch.bfloat16)
    # AdamW's two moments per parameter; kimi_k2's MuonClip keeps one for the matrices Muon updates and none
    # for the routers' biases (tests/test_kimi_k2_muonclip.py checks its term against the real state)
    optimizer_bytes = 2 * param_bytes if spec.package != "kimi_k2" else spec.infra.optimizer_bytes(model, 1)
    assert (single["weights"], single["gradients"], single["optimizer"]) == (param_bytes, param_bytes, optimizer_bytes)
    sharded = spec.infra.memory_plan(model, plan_args("fsdp"), 2, torch.bfloat16)
    for term in ("weights", "gradients", "optimizer"):
        assert sharded[term] * 2 == single[term], term
    ddp = spec.infra.memory_plan(model, plan_args("ddp"), 2, torch.bfloat16)
    assert ddp["gradients"] == 2 * param_bytes  # DDP's buckets hold a second copy


def saved_activation_bytes(model, x, y):
    """Bytes of the distinct storages a forward with loss saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(storages.values())


@pytest.mark.parametrize("spec", MODELS, ids=MODEL_IDS)
def test_activation_estimate_within_1_5x_of_saved_tensors(spec):
    # fp32 on CPU: what autograd saves is the estimate's main part; it adds one block of backward
    # temporaries and the loss's logits chunk, which are not saved tensors, hence 8 layers (so that
    # the extra block is an eighth) and the bound 1.5x rather than 2x
    args = plan_args(batch_size=2, seq_len=64)
    model = spec.build(n_layer=8)
    x = torch.randint(0, model.cfg.vocab_size, (args.batch_size, args.seq_len))
    measured = saved_activation_bytes(model, x, x)
    estimate = spec.infra.memory_plan(meta_model(spec, n_layer=8), args, 1, torch.float32)["activations"]
    assert measured <= estimate <= 1.5 * measured, (estimate, measured, estimate / measured)


@pytest.mark.parametrize("spec", MODELS[:2], ids=MODEL_IDS[:2])
def test_run_that_cannot_fit_is_refused_before_allocation(spec, tmp_path, monkeypatch):
    def allocated(*_):
        raise AssertionError("parameters were initialised before the memory check")

    monkeypatch.setattr(spec.infra, "device_memory", lambda device: 2**10)  # a 1 KiB "GPU"
    monkeypatch.setattr(spec.infra, "init_parameters", allocated)
    with pytest.raises(
        SystemExit, match=r"needs about .* per process \(estimate\), more than the .* of cpu; the biggest term is"
    ):
        spec.train.main(train_args(spec, tmp_path / "data", tmp_path / "out"))
