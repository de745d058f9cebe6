"""posttrain/dpo.py's trainer: the batch loss is dpo_loss of the completions' summed log-probs, precomputed
reference log-probs stand in for the reference model, preference data in TRL's format is read (and bad
data refused in one line), and a short run raises preference accuracy and reward margin."""

import json
import math
import random

import pytest
import torch

from posttrain import dpo, tasks
from shared.models import MODELS
from shared.tokenizer import load_tokenizer
from tests.train_helpers import main_on_ranks, metrics

GPT2 = next(spec for spec in MODELS if spec.name == "gpt2")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


def toy_pairs(n, seed=0):
    args = dpo.parse_args(["--init-from", "none", "--eval-prompts", "4", "--seed", str(seed)])
    return tasks.Preferences(args).batch(n)


def summed_logps(model, tokenizer, prompt, completion):
    """log p(completion + EOT | prompt) from one unpadded forward: the quantity DPO compares."""
    p, c = tokenizer.encode(prompt), tokenizer.encode(completion) + [tokenizer.eot_id]
    ids = torch.tensor([p + c])
    logprobs = model(ids[:, :-1])[0].log_softmax(-1)[0]  # (L-1, vocab)
    return sum(logprobs[len(p) - 1 + j, t] for j, t in enumerate(c))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_batch_loss_is_dpo_loss_of_summed_logps(tokenizer, loss_type):
    args = dpo.parse_args(["--init-from", "none", "--loss-type", loss_type, "--beta", "0.5"])
    policy = GPT2.build(seed=0, vocab_size=tokenizer.vocab_size)
    reference = GPT2.build(seed=1, vocab_size=tokenizer.vocab_size).requires_grad_(False)
    pairs = toy_pairs(5)
    assert all(pair["chosen"] != pair["rejected"] for pair in pairs)
    loss, chosen_rewards, rejected_rewards, _ = dpo.dpo_batch(policy, reference, pairs, tokenizer, args, "cpu")

    def column(model, key):
        return torch.stack([summed_logps(model, tokenizer, pair["prompt"], pair[key]) for pair in pairs])

    def length(key):  # completion tokens, EOT included
        return torch.tensor([len(tokenizer.encode(pair[key])) + 1 for pair in pairs], dtype=torch.float32)

    chosen, rejected = column(policy, "chosen"), column(policy, "rejected")
    ref_chosen, ref_rejected = column(reference, "chosen"), column(reference, "rejected")
    expected = dpo.dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=0.5,
        loss_type=loss_type,
        chosen_lengths=length("chosen"),
        rejected_lengths=length("rejected"),
    )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert chosen_rewards.tolist() == pytest.approx((0.5 * (chosen - ref_chosen)).tolist(), abs=1e-5)
    assert rejected_rewards.tolist() == pytest.approx((0.5 * (rejected - ref_rejected)).tolist(), abs=1e-5)
    # the gradient flows into the policy only
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in reference.parameters())


def test_precomputed_reference_logps_replace_the_reference_model(tokenizer):
    args = dpo.parse_args(["--init-from", "none"])
    policy = GPT2.build(seed=0, vocab_size=tokenizer.vocab_size)
    reference = GPT2.build(seed=1, vocab_size=tokenizer.vocab_size)
    pairs = toy_pairs(4)
    with torch.no_grad():
        for pair in pairs:
            pair["ref_chosen_logps"] = summed_logps(reference, tokenizer, pair["prompt"], pair["chosen"]).item()
            pair["ref_rejected_logps"] = summed_logps(reference, tokenizer, pair["prompt"], pair["rejected"]).item()
    with_model = dpo.dpo_batch(policy, reference, pairs, tokenizer, args, "cpu")[0]
    with_columns = dpo.dpo_batch(policy, None, pairs, tokenizer, args, "cpu")[0]
    assert with_columns.item() == pytest.approx(with_model.item(), abs=1e-5)
    # and policy == reference: every margin is 0, the sigmoid loss ln 2
    same = dpo.dpo_batch(policy, policy, pairs, tokenizer, args, "cpu")[0]
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)


def test_rejected_answers_differ_in_one_word_inside_the_task_vocabulary():
    """A fresh model's default tokenizer is the task vocabulary, which holds add's answers 0..98 only: a
    corruption of 0 or 98 must not step outside it."""
    vocab, rng = tasks.task_vocabulary(), random.Random(0)
    for answer in (" 0", " 5", " 98", " t a c"):
        for _ in range(20):
            rejected = tasks.corrupt(answer, rng)
            assert sum(a != b for a, b in zip(answer.split(), rejected.split())) == 1
            assert vocab.decode(vocab.encode(rejected)) == rejected


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_preference_data_is_read_and_bad_data_refused(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b", "other": 1} for i in range(3)]
    assert tasks.read_preferences(write_jsonl(tmp_path / "ok.jsonl", rows)) == [
        {"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(3)
    ]
    no_rejected = [{"prompt": "p", "chosen": " a"}]
    with pytest.raises(SystemExit, match="no rejected column"):
        tasks.read_preferences(write_jsonl(tmp_path / "a.jsonl", no_rejected))
    half_refs = [{"prompt": "p", "chosen": " a", "rejected": " b", "ref_chosen_logps": -1.0}]
    with pytest.raises(SystemExit, match="ref_chosen_logps but not its partner"):
        tasks.read_preferences(write_jsonl(tmp_path / "b.jsonl", half_refs))
    conversational = [{"prompt": [{"role": "user", "content": "p"}], "chosen": " a", "rejected": " b"}]
    with pytest.raises(SystemExit, match="plain strings"):
        tasks.read_preferences(write_jsonl(tmp_path / "c.jsonl", conversational))
    with pytest.raises(SystemExit, match="--label-smoothing"):
        dpo.parse_args(["--label-smoothing", "0.1"])


def test_short_run_raises_preference_accuracy_and_margin(tmp_path):
    """A fresh model on 16 toy pairs read from a JSONL file; the 'held-out' rows repeat 8 of them, so a
    few steps of fitting must show: accuracy 0 (all margins 0) -> above one half, margin > 0."""
    pairs = toy_pairs(16, seed=3)
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs + pairs[:8])
    out = tmp_path / "run"
    history = dpo.main(
        ["--init-from", "none", "--data", data, "--eval-prompts", "8", "--steps", "8", "--batch-size", "8"]
        + ["--lr", "3e-3", "--beta", "1", "--warmup-steps", "2", "--max-new-tokens", "4", "--eval-every", "0"]
        + ["--out-dir", str(out)]
    )
    evals = [row for row in history if "eval_accuracy" in row]
    assert (evals[0]["eval_accuracy"], evals[0]["eval_margin"]) == (0.0, 0.0)
    assert evals[-1]["eval_accuracy"] > 0.5 and evals[-1]["eval_margin"] > 0
    meta = torch.load(out / "ckpt.pt", weights_only=True)["meta"]
    assert meta["posttrain"]["method"] == "dpo"
    assert meta["posttrain"]["accuracy"]["after"] == evals[-1]["eval_accuracy"]


def dpo_args(out_dir, *extra):
    """Two steps of DPO of the registry's small GPT-2 on toy pairs."""
    return [str(a) for a in [
        "--model", "gpt2", "--init-from", "none", "--out-dir", out_dir, "--device", "cpu", "--steps", "2", "--batch-size", "4",
        "--eval-prompts", "4", "--eval-every", "0", "--max-new-tokens", "4", "--lr", "1e-2", "--warmup-steps", "1",
        "--log-every", "1", "--beta", "1", *extra,
    ]]  # fmt: skip


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, parallel):
    one = dpo.main(dpo_args(tmp_path / "one"))
    main_on_ranks(dpo.main, *dpo_args(tmp_path / "two", "--parallel", parallel))
    two = metrics(tmp_path / "two")
    # float32 sums in another order: summed log-probs agree to about 1e-5 relative
    for key in ("loss", "accuracy", "margin", "eval_accuracy", "eval_margin"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-4, abs=1e-6)
