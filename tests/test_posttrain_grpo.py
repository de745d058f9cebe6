"""posttrain/grpo.py's trainer: the loss it logs is grpo_loss recomputed from the rollouts it logged, and
2 gloo ranks (DDP, FSDP) give one process's losses. The loss functions themselves are pinned against
TRL in tests/test_posttrain_losses.py."""

import json

import pytest
import torch

from posttrain import common, grpo, tasks
from shared.models import MODELS
from shared.tokenizer import load_tokenizer
from tests.train_helpers import main_on_ranks, metrics

GPT2 = next(spec for spec in MODELS if spec.name == "gpt2")


def completion_length(prompts, completions):
    """A reward a fresh model's samples already spread over: the completion's length in characters."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A small GPT-2 (GPT-2's vocabulary) whose samples stop at random lengths: its final norm outputs the
    same vector everywhere (gain 0, bias e_0), so each token is drawn from one fixed distribution in which
    EOT has a third of the mass. Completions of different lengths make the token counts differ between
    processes, which the normalisation over all of them must see."""
    tokenizer = load_tokenizer("gpt2")
    model = GPT2.build(seed=0, vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()[0] = 1.0
        model.lm_head.weight[tokenizer.eot_id, 0] = 10.0  # e^10 / (e^10 + 50,256) = 0.3
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    return path


def grpo_args(policy_dir, out_dir, *extra):
    """A few seconds of GRPO of that policy, rewarded by completion_length."""
    return [str(a) for a in [
        "--model", "gpt2", "--init-from", policy_dir, "--out-dir", out_dir, "--device", "cpu", "--steps", "2", "--batch-size", "2",
        "--group-size", "4", "--eval-prompts", "2", "--eval-every", "0", "--max-new-tokens", "4", "--lr", "1e-3",
        "--warmup-steps", "1", "--log-every", "1", "--reward", f"{__name__}.completion_length", *extra,
    ]]  # fmt: skip


@pytest.mark.parametrize(
    "level, loss_type", [("token", "dapo"), ("sequence", "grpo"), ("token", "dr_grpo")], ids=lambda v: v
)
def test_logged_loss_is_grpo_loss_of_the_logged_rollouts(policy_dir, tmp_path, level, loss_type):
    # --temperature 1.5: the log-probs are the sampling distribution's (logits / T), not the policy's at T = 1
    extra = ["--steps", "1", "--num-iterations", "1", "--beta", "0.04", "--log-completions", "--temperature", "1.5"]
    extra += ["--importance-sampling-level", level, "--loss-type", loss_type]
    rows = grpo.main(grpo_args(policy_dir, tmp_path, *extra))
    logged = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 2 * 4
    # the same completions, rewarded again, scored by the initial policy (which is also the reference)
    tokenizer = load_tokenizer("gpt2")
    prompts = [tokenizer.encode(r["prompt"]) for r in logged]
    ids, mask = tasks.collate(prompts, [r["completion_ids"] for r in logged], tokenizer.eot_id, "cpu")
    texts = [tokenizer.decode([t for t in r["completion_ids"] if t != tokenizer.eot_id]) for r in logged]
    rewards = torch.tensor(completion_length(None, texts))
    assert rewards.tolist() == [r["reward"] for r in logged]
    policy = GPT2.model.Transformer.from_pretrained(policy_dir)
    logps = common.completion_part(common.sequence_logps(policy, ids, mask, temperature=1.5), mask)
    cmask = common.completion_part(mask, mask)
    loss = grpo.grpo_loss(
        logps,
        None,
        logps.detach(),
        grpo.group_advantages(rewards, 4),
        cmask,
        beta=0.04,
        importance_sampling_level=level,
        loss_type=loss_type,
        max_completion_length=4,
        num_items_in_batch=cmask.sum(),
    )
    step = next(r for r in rows if "loss" in r)
    assert step["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    # on-policy its value is near 0 (ratio 1, advantages centred): the gradient is what the update uses
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).norm()
    assert step["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    assert rewards.std() > 0 and cmask.sum(-1).std() > 0  # the advantages do not vanish; lengths differ
    assert step["reward"] == pytest.approx(rewards.mean().item(), rel=1e-6)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(policy_dir, tmp_path, parallel):
    """Two steps of two clipped updates each, with the KL term: each process samples whole groups from
    per-completion seeds, so the batch, and hence every loss, is one process's."""
    one = grpo.main(grpo_args(policy_dir, tmp_path / "one"))
    main_on_ranks(grpo.main, *grpo_args(policy_dir, tmp_path / "two", "--parallel", parallel))
    two = [r for r in metrics(tmp_path / "two") if "loss" in r]
    one = [r for r in one if "loss" in r]
    for name in ("loss", "reward", "kl", "clip_fraction", "entropy", "completion_length"):
        assert [r[name] for r in two] == pytest.approx([r[name] for r in one], rel=1e-4, abs=1e-6), name
    assert one[-1]["kl"] > 0  # the second step's policy has moved from the reference
