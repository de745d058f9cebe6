"""train.py's extension points: the loop really calls them, with each forward's aux dict, and
Qwen 3's implementation logs the balancing loss and expert load the model reports."""

import importlib

import pytest
import torch

from registry import MODELS, by_name
from train_helpers import run_in_process, train_args

models = pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)


@models
def test_the_loop_calls_every_extension_point(spec, toy_data, tmp_path, monkeypatch):
    """2 steps of 2 micro-batches: after_forward sees 4 aux dicts, after_step runs twice (after the
    optimizer step: the weights have changed), and summary's figures land in the metrics."""
    train = importlib.import_module(f"{spec.package}.train")
    calls = []

    class Recording(train.TrainingExtras):
        def after_forward(self, aux):
            assert isinstance(aux, dict)
            calls.append("forward")
            super().after_forward(aux)

        def after_step(self, model):
            calls.append(("step", model.lm_head.weight.detach().clone()))
            super().after_step(model)

        def summary(self):
            return {**super().summary(), "probe": 1.5}

    monkeypatch.setattr(train, "TrainingExtras", Recording)
    rows = run_in_process(spec, *train_args(spec, toy_data, tmp_path, "--max-steps", 2, "--total-batch-tokens", 128))
    assert [c if isinstance(c, str) else c[0] for c in calls] == ["forward", "forward", "step"] * 2
    assert not torch.equal(calls[2][1], calls[5][1])  # each after_step saw the updated weights
    assert [r["probe"] for r in rows if "loss" in r] == [1.5, 1.5]


def test_qwen3_extras_average_what_the_forward_reports():
    from qwen3.train import TrainingExtras

    model = by_name("qwen3_moe").build(router_aux_loss_coef=1.0).train()
    extras = TrainingExtras(model, None, torch.device("cpu"))
    assert "active per token" in extras.describe()
    reported = []
    for seed in range(2):
        idx = torch.randint(0, model.cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(seed))
        aux = {}
        model(idx, idx, aux=aux)
        extras.after_forward(aux)
        reported.append(aux)
    k, n_moe = model.cfg.n_experts_per_tok, model.cfg.n_layer
    assert extras.load.sum(-1).tolist() == [2 * 15 * k] * n_moe  # every (token, pick) counted once
    figures = extras.summary()
    mean_aux = sum(a["load_balancing_loss"].item() for a in reported) / 2
    assert figures["aux_loss"] == pytest.approx(mean_aux, rel=1e-6)
    load = sum(a["expert_load"] for a in reported)
    assert figures["expert_load_max_over_mean"] == pytest.approx((load.max(-1).values / load.mean(-1)).max().item())
    assert extras.forwards == 0 and extras.load.sum() == 0  # reset for the next interval


def test_qwen3_dense_has_no_extras():
    from qwen3.train import TrainingExtras

    extras = TrainingExtras(by_name("qwen3").build(), None, torch.device("cpu"))
    extras.after_forward({})
    assert extras.describe() == "" and extras.summary() == {}


def test_moe_training_logs_balancing_loss_and_expert_load(toy_data, tmp_path, monkeypatch):
    """Under --activation-checkpointing each block runs twice, yet every micro-batch's tokens are
    counted once: the statistics come from Transformer.forward, which recomputation does not re-run."""
    import qwen3.train

    spec = by_name("qwen3_moe")
    per_forward = []

    class Recording(qwen3.train.TrainingExtras):
        def after_forward(self, aux):
            per_forward.append(aux["expert_load"].sum(-1).tolist())
            super().after_forward(aux)

    monkeypatch.setattr(qwen3.train, "TrainingExtras", Recording)
    rows = run_in_process(spec, *train_args(spec, toy_data, tmp_path, "--max-steps", 3), "--activation-checkpointing")
    tokens, k, n_moe = 4 * 16, spec.config().n_experts_per_tok, spec.config().n_layer
    assert per_forward == [[tokens * k] * n_moe] * 3
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 3 and all(r["aux_loss"] > 0 and r["expert_load_max_over_mean"] >= 1.0 for r in logged)
