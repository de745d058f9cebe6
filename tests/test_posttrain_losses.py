"""The post-training losses (posttrain/dpo.py, grpo.py, ppo.py) against TRL on identical float64
tensors, values and gradients to 1e-5, plus the properties the papers imply.

DPO and GRPO/GSPO run TRL 1.16's own trainer code: DPOTrainer._compute_loss and
GRPOTrainer._compute_loss, called unbound on a stand-in `self` that carries only the attributes
those methods read, with the model's forward replaced by the per-token log-probs under test, so
TRL's real loss and aggregation code runs without a model. PPO left TRL in 1.13 and 1.12 cannot
be installed beside 1.16, so its conventions are pinned by examples worked out by hand from trl
1.12.0's trl/experimental/ppo/ppo_trainer.py (PPOTrainer.train steps 4-6 and the minibatch loss;
masked_whiten / masked_var there).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from posttrain.dpo import dpo_loss
from posttrain.grpo import group_advantages, grpo_loss
from posttrain.ppo import gae, masked_whiten, ppo_policy_loss, ppo_token_rewards, ppo_value_loss, value_mask

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

TOL = {"atol": 1e-5, "rtol": 1e-5}
SEEDS = (0, 1, 2)


class SingleProcessAccelerator:
    """The accelerate.Accelerator methods TRL's loss code calls, for one CPU process."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def right_padded_mask(rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, length) 0/1 float64, each row a prefix of random length 1..length; row 0 full."""
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    lengths[0] = length
    return (torch.arange(length) < lengths.unsqueeze(1)).double()


def random_logps(shape, generator: torch.Generator) -> torch.Tensor:
    return -torch.rand(shape, generator=generator, dtype=torch.float64) * 3


# -----------------------------------------------------------------------------
# DPO


def trl_dpo_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    """TRL 1.16's DPOTrainer._compute_loss on per-token log-probs (2B, T) of [chosen; rejected] rows."""
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SingleProcessAccelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    rows, length = per_token_logps.shape
    # TRL's completion_mask covers input_ids; its shift [:, 1:] aligns with the log-probs of the next token
    full_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), completion_mask.long()], dim=1)
    outputs = SimpleNamespace(
        log_probs=per_token_logps * completion_mask,  # the fused head gives 0 where labels are -100
        entropy=torch.zeros(rows, length),
        mean_logits=torch.zeros(rows, length),
        is_top1=torch.zeros(rows, length, dtype=torch.bool),
    )
    inputs = {
        "input_ids": torch.zeros(rows, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, length + 1, dtype=torch.long),
        "completion_mask": full_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)]
)
def test_dpo_loss_equals_trl(loss_type, label_smoothing, seed):
    g = torch.Generator().manual_seed(seed)
    pairs, length, beta = 5, 7, [0.1, 0.5, 2.0][seed]
    mask = right_padded_mask(2 * pairs, length, g)
    per_token = random_logps((2 * pairs, length), g).requires_grad_()
    ref = (random_logps((2 * pairs, length), g) * mask).sum(1)
    expected = trl_dpo_loss(per_token, mask, ref[:pairs], ref[pairs:], beta, loss_type, label_smoothing)
    (expected_grad,) = torch.autograd.grad(expected, per_token)

    logps = (per_token * mask).sum(1)
    lengths = mask.sum(1)
    ours = dpo_loss(
        logps[:pairs],
        logps[pairs:],
        ref[:pairs],
        ref[pairs:],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
    )
    (grad,) = torch.autograd.grad(ours, per_token)
    assert_close(ours, expected, **TOL)
    assert_close(grad, expected_grad, **TOL)


def test_dpo_is_ln2_when_policy_equals_reference():
    logps = random_logps((4,), torch.Generator().manual_seed(0))
    other = logps - 1.0
    loss = dpo_loss(logps, other, logps, other, beta=0.3)
    assert_close(loss, torch.tensor(math.log(2), dtype=torch.float64))


def test_dpo_bad_arguments_are_named():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="sigmoid", label_smoothing=0.1)


# -----------------------------------------------------------------------------
# GRPO / GSPO


def trl_grpo_loss(logps, old_logps, ref_logps, advantages, mask, num_items_in_batch, **config):
    """TRL 1.16's GRPOTrainer._compute_loss with _get_per_token_logps_and_entropies returning logps."""
    rows, length = logps.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps).detach(), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=SingleProcessAccelerator(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(
            use_bias_correction_kl=config.pop("use_bias_correction_kl"), delta=None, steps_per_generation=1
        ),
        **config,
    )
    inputs = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": num_items_in_batch,
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    return trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)


GRPO_CASES = [
    (loss_type, level, beta, off_policy, bias_correction)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
    for level in ("token", "sequence")
    for beta, off_policy, bias_correction in (
        (0.0, False, True),
        (0.04, True, True),
        (0.04, True, False),
        (0.1, False, True),
    )
]


@pytest.mark.parametrize(("loss_type", "level", "beta", "off_policy", "bias_correction"), GRPO_CASES)
def test_grpo_loss_equals_trl(loss_type, level, beta, off_policy, bias_correction):
    g = torch.Generator().manual_seed(len(loss_type) + 10 * int(off_policy))
    rows, length, max_completion_length = 6, 5, 8
    mask = right_padded_mask(rows, length, g)
    logps = random_logps((rows, length), g).requires_grad_()
    # old log-probs up to 0.5 nats away, so ratios fall outside [1 - 0.2, 1 + 0.28] on both sides
    old_logps = (
        (logps.detach() + (torch.rand(rows, length, generator=g, dtype=torch.float64) - 0.5)) if off_policy else None
    )
    ref_logps = random_logps((rows, length), g)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    num_items = mask.sum() * 3  # as if this were one of three micro-batches of the generation batch
    config = dict(
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        importance_sampling_level=level,
        loss_type=loss_type,
        use_bias_correction_kl=bias_correction,
        max_completion_length=max_completion_length,
    )
    expected = trl_grpo_loss(logps, old_logps, ref_logps, advantages, mask, num_items, **config)
    (expected_grad,) = torch.autograd.grad(expected, logps)
    ours = grpo_loss(logps, old_logps, ref_logps, advantages, mask, num_items_in_batch=num_items, **config)
    (grad,) = torch.autograd.grad(ours, logps)
    assert_close(ours, expected, **TOL)
    assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale_rewards):
    """TRL computes advantages inside _generate_and_score_completions, which needs a model and a
    generation; so this compares against its formula built on TRL's own nanstd (trl.trainer.utils)."""
    g = torch.Generator().manual_seed(0)
    group_size = 4
    rewards = torch.randint(0, 3, (12,), generator=g).double()
    rewards[:group_size] = 1.0  # a group whose rewards are all equal: std 0
    group_means = rewards.view(-1, group_size).mean(1).repeat_interleave(group_size)
    if scale_rewards == "batch":
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    else:
        std = trl_utils.nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    expected = rewards - group_means
    if scale_rewards != "none":
        expected = expected / (std + 1e-4)
    assert_close(group_advantages(rewards, group_size, scale_rewards), expected, **TOL)


def test_group_advantages_are_zero_mean_per_group():
    rewards = torch.rand(5 * 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        means = group_advantages(rewards, 3, scale).view(5, 3).mean(1)
        assert_close(means, torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gspo_on_policy_ratio_is_one():
    """On-policy, GSPO's sequence ratio is exactly 1, so the grpo-type loss is -mean advantage; its
    gradient is that of mean_i A_i x (masked mean token log-prob of sequence i), eq. 11 of GSPO."""
    g = torch.Generator().manual_seed(3)
    mask = right_padded_mask(4, 6, g)
    logps = random_logps((4, 6), g).requires_grad_()
    advantages = torch.randn(4, generator=g, dtype=torch.float64)
    loss = grpo_loss(logps, None, None, advantages, mask, importance_sampling_level="sequence", loss_type="grpo")
    assert_close(loss, -advantages.mean(), atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(loss, logps)
    assert_close(grad, -(advantages / mask.sum(1)).unsqueeze(1) * mask / 4, atol=1e-12, rtol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_gradient_is_zero_only_past_the_clip_on_the_advantage_side(level):
    """A > 0 and ratio above 1 + eps_high, or A < 0 and below 1 - eps_low: clipped, no gradient;
    the other side of the range is not clipped (PPO's pessimistic min)."""
    mask = torch.ones(1, 1, dtype=torch.float64)
    for log_ratio, advantage, clipped in ((0.5, 1.0, True), (-0.5, -1.0, True), (-0.5, 1.0, False), (0.5, -1.0, False)):
        logps = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
        old = torch.full((1, 1), -log_ratio, dtype=torch.float64)
        loss = grpo_loss(
            logps, old, None, torch.tensor([advantage], dtype=torch.float64), mask, importance_sampling_level=level
        )
        (grad,) = torch.autograd.grad(loss, logps)
        assert (grad.abs().item() == 0) == clipped, (log_ratio, advantage)


# -----------------------------------------------------------------------------
# PPO (TRL 1.12's conventions, written out by hand)


def test_ppo_token_rewards_put_the_score_after_the_last_token():
    """ppo_trainer.py step 4: kl = logprobs - ref (k1) or exp(r) - 1 - r (k3), reward -kl_coef * kl,
    the score added at sequence_length + 1, or at the last position when the row is full."""
    logps = torch.tensor([[-1.0, -2.0, -2.5], [-1.0, -2.0, -2.5]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.5, -1.0, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    scores = torch.tensor([2.0, 3.0], dtype=torch.float64)
    k1 = ppo_token_rewards(logps, ref, scores, mask, kl_coef=0.1)
    assert_close(k1, torch.tensor([[-0.05, 0.1, 2.0], [-0.05, 0.1, -0.05 + 3.0]], dtype=torch.float64))
    k3 = ppo_token_rewards(logps, ref, scores, mask, kl_coef=0.1, kl_estimator="k3")
    kl = [math.exp(r) - 1 - r for r in (-0.5, 1.0, -0.5)]
    assert_close(
        k3,
        torch.tensor(
            [[-0.1 * kl[0], -0.1 * kl[1], 2.0], [-0.1 * kl[0], -0.1 * kl[1], -0.1 * kl[2] + 3.0]], dtype=torch.float64
        ),
    )


def test_gae_three_tokens_by_hand():
    """Two completion tokens, the score on the third position (value mask covers it), gamma 0.9,
    lambda 0.5, V = [1, 2, 3], r = [0.1, -0.2, 1]:
    delta_2 = 1 - 3 = -2;           A_2 = -2
    delta_1 = -0.2 + 0.9*3 - 2 = 0.5;  A_1 = 0.5 + 0.45*(-2) = -0.4
    delta_0 = 0.1 + 0.9*2 - 1 = 0.9;   A_0 = 0.9 + 0.45*(-0.4) = 0.72
    returns = A + V = [1.72, 1.6, 1.0]; whitened over the two tokens with the unbiased variance
    (n/(n-1) = 2): +-0.56 / sqrt(0.6272) = +-1/sqrt(2); the padding position 0."""
    rewards = torch.tensor([[0.1, -0.2, 1.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    raw, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5, whiten=False)
    assert_close(raw, torch.tensor([[0.72, -0.4, 0.0]], dtype=torch.float64))
    assert_close(returns, torch.tensor([[1.72, 1.6, 1.0]], dtype=torch.float64))
    whitened, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    half = 0.56 / math.sqrt(0.6272 + 1e-8)
    assert_close(whitened, torch.tensor([[half, -half, 0.0]], dtype=torch.float64))


def test_gae_ignores_values_past_the_value_mask():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 9.0, 9.0]], dtype=torch.float64)
    _, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    assert_close(returns, torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    assert value_mask(mask).tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_masked_whiten_matches_trl_112_by_hand():
    """masked_var's Bessel factor mask_sum / (mask_sum - 1); shift_mean=False adds the mean back."""
    values = torch.tensor([[1.0, 2.0, 6.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mean, var = 3.0, ((2.0**2 + 1.0**2 + 3.0**2) / 3) * 3 / 2  # 7
    expected = (values - mean) / math.sqrt(var + 1e-8)
    assert_close(masked_whiten(values, mask), expected)
    assert_close(masked_whiten(values, mask, shift_mean=False), expected + mean)


def test_ppo_policy_loss_by_hand_and_its_clip():
    """pg_loss = masked_mean(max(-A r, -A clip(r, 1 - c, 1 + c))) over the completion tokens."""
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(1, 4, dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss = ppo_policy_loss(logps, old, advantages, mask, cliprange=0.2)
    # token 0: A>0, r=1.5 clipped to 1.2 -> -1.2; token 1: r=0.5, unclipped -0.5; token 2: A<0, r=1.1 -> 2.2
    assert_close(loss, torch.tensor((-1.2 - 0.5 + 2.2) / 3, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad[0, 0] == 0 and grad[0, 3] == 0  # clipped; padding
    assert_close(grad[0, 1:3], torch.tensor([-0.5 / 3, 2.2 / 3], dtype=torch.float64))


def test_ppo_value_loss_by_hand():
    """vf_loss = 0.5 * masked_mean(max((v - R)^2, (clip(v, v_old +- c) - R)^2)) over the value mask
    (the completion plus one position)."""
    values = torch.tensor([[1.0, 0.0, 5.0, 9.0]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0, 4.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # clip 0.5: v 1 -> 0.5: max(0, 0.25); v 0 stays: 1; v 5 -> 4.5: max(0, 0.25); position 3 outside
    loss = ppo_value_loss(values, old, returns, mask, cliprange_value=0.5)
    assert_close(loss, torch.tensor(0.5 * (0.25 + 1.0 + 0.25) / 3, dtype=torch.float64))
