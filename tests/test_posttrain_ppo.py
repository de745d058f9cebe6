"""posttrain/ppo.py: the trainer gives the loss functions the right tensors (completion tokens only, the
score after each completion's last token, the minibatch's rows), the value head reads the state before
each token and learns, --ppo-epochs 0 leaves the policy alone, and 2 gloo ranks give one process's run."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from posttrain import common, ppo
from shared.models import MODELS
from tests.train_helpers import main_on_ranks, metrics

GPT2 = next(spec for spec in MODELS if spec.name == "gpt2")
EOT = 50256  # GPT-2's <|endoftext|>, the rollouts' stop token


def letter_variety(prompts, completions):
    """A reward that differs between a fresh model's completions (exact match would be 0 for all)."""
    return [len(set(completion)) / 8 for completion in completions]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A small untied GPT-2 with GPT-2's vocabulary whose EOT logit is large at some positions and not at
    others, so that its completions stop at mixed lengths and the batch holds padding."""
    model = GPT2.build(seed=0, vocab_size=EOT + 1, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[EOT] = torch.randn(model.cfg.n_embd, generator=torch.Generator().manual_seed(0)) * 3
    path = tmp_path_factory.mktemp("policy") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "meta": {"config": dataclasses.asdict(model.cfg)}}, path)
    return path


def ppo_args(out_dir, policy, *extra):
    """A few seconds of PPO: 8 completions per step, 2 epochs of 2 minibatches."""
    return [str(a) for a in [
        "--model", "gpt2", "--init-from", policy, "--out-dir", out_dir, "--device", "cpu", "--steps", "1", "--batch-size", "8",
        "--minibatches", "2", "--ppo-epochs", "2", "--eval-prompts", "2", "--eval-every", "0",
        "--max-new-tokens", "5", "--lr", "1e-2", "--warmup-steps", "0", "--log-every", "1",
        "--reward", "tests.test_posttrain_ppo.letter_variety", *extra,
    ]]  # fmt: skip


def spy(monkeypatch, name, calls):
    """Replace ppo.<name> by a wrapper that records its arguments and result."""
    real = getattr(ppo, name)

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(SimpleNamespace(args=[a.detach().clone() if torch.is_tensor(a) else a for a in args], out=result))
        return result

    monkeypatch.setattr(ppo, name, recording)


def test_losses_see_the_batchs_completion_tokens(tmp_path, policy, monkeypatch):
    rollouts, policy_calls, value_calls = [], [], []
    spy(monkeypatch, "score_rollouts", rollouts)
    spy(monkeypatch, "ppo_policy_loss", policy_calls)
    spy(monkeypatch, "ppo_value_loss", value_calls)
    rows = ppo.main(ppo_args(tmp_path, policy))
    batch = rollouts[0].out
    lengths = batch["mask"].sum(1)  # (B,) each completion's tokens in the (B, L) layout
    assert len(set(lengths.tolist())) > 1  # mixed lengths: the batch holds padding
    cmask = batch["cmask"]
    assert cmask.sum(1).tolist() == lengths.tolist() and (cmask[:, -1] == 0).all()  # a column past the longest
    # policy == reference at the first rollout, so the KL part is 0: the score sits right after the last token
    expected = torch.zeros_like(batch["rewards"])
    expected[torch.arange(8), lengths.long()] = batch["scores"]
    assert torch.allclose(batch["rewards"], expected, atol=1e-6)
    adv = batch["advantages"]
    assert (adv[cmask == 0] == 0).all() and abs(adv[cmask == 1].mean()) < 1e-5  # whitened over the tokens only
    # each update: the loss functions get the rows of its minibatch, cut to the columns they fill
    assert len(policy_calls) == len(value_calls) == 4
    args = SimpleNamespace(seed=0, batch_size=8, minibatches=2)
    order = [mb for epoch in range(2) for mb in ppo.minibatches(args, 0, epoch)]
    for minibatch, pcall, vcall in zip(order, policy_calls, value_calls):
        logps, old_logps, advantages, mask, _ = pcall.args
        width = logps.size(1)
        assert torch.equal(mask, cmask[minibatch, :width]) and torch.equal(vcall.args[3], mask)
        assert torch.equal(old_logps, batch["old_logps"][minibatch, :width])
        assert torch.equal(advantages, adv[minibatch, :width])
        assert torch.equal(vcall.args[1], batch["old_values"][minibatch, :width])
        assert torch.equal(vcall.args[2], batch["returns"][minibatch, :width])
        assert (logps[mask == 0] == 0).all()
    first = policy_calls[0].args
    assert torch.allclose(first[0], first[1], atol=1e-5)  # the first update is on-policy: ratio 1
    # the logged losses are the mean over the updates of the loss functions' values
    policy_loss = sum(c.out.item() for c in policy_calls) / 4
    value_loss = sum(c.out.item() for c in value_calls) / 4
    step = next(r for r in rows if "policy_loss" in r)
    assert step["policy_loss"] == pytest.approx(policy_loss, rel=1e-5)
    assert step["value_loss"] == pytest.approx(value_loss, rel=1e-5) and value_loss > 0


def test_values_read_the_state_before_each_token_and_learn():
    model = GPT2.build(seed=3, tie_embeddings=False)
    head = ppo.ValueHead(model.cfg.n_embd)
    torch.nn.init.normal_(head.proj.weight)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    mask = torch.ones(2, 9)
    logps, values = ppo.logps_and_values(model, model, head, ids, mask)
    assert torch.equal(logps, common.sequence_logps(model, ids, mask))  # the hook changes nothing
    changed = ids.clone()
    changed[:, 4] = (ids[:, 4] + 1) % model.cfg.vocab_size
    _, other = ppo.logps_and_values(model, model, head, changed, mask)
    assert torch.equal(values[:, :5], other[:, :5])  # the value at t is of the tokens before t ...
    assert not torch.allclose(values[:, 5], other[:, 5])  # ... and sees token t-1
    values.sum().backward()
    assert head.proj.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad is None  # the value's own head
    assert next(model.layers.parameters()).grad is not None  # the shared trunk learns from the value loss


def test_no_epochs_leave_the_policy_and_updates_train_both_heads(tmp_path, policy):
    initial = torch.load(policy, weights_only=True)["model"]
    ppo.main(ppo_args(tmp_path / "none", policy, "--ppo-epochs", "0"))
    after = torch.load(tmp_path / "none" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(initial[k], after[k]) for k in initial)
    assert all((v == 0).all() for v in torch.load(tmp_path / "none" / "value_head.pt").values())
    ppo.main(ppo_args(tmp_path / "one", policy, "--ppo-epochs", "1"))
    after = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    assert not torch.equal(initial["lm_head.weight"], after["lm_head.weight"])
    assert all((v != 0).any() for v in torch.load(tmp_path / "one" / "value_head.pt").values())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, policy, parallel):
    one = ppo.main(ppo_args(tmp_path / "one", policy, "--steps", "2"))
    main_on_ranks(ppo.main, *ppo_args(tmp_path / "two", policy, "--steps", "2", "--parallel", parallel))
    two = metrics(tmp_path / "two")
    for key in ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-4, abs=1e-6)
