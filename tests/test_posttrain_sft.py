"""posttrain/sft.py: batched rollouts with the KV cache, per-sequence EOS, completion-only loss, a short
run, its checkpoints, and 2 gloo ranks against one process."""

import random

import pytest
import torch

from posttrain import common, sft, tasks
from shared.models import MODELS
from shared.tokenizer import load_tokenizer
from tests.train_helpers import main_on_ranks, metrics

GPT2 = next(spec for spec in MODELS if spec.name == "gpt2")


def random_prompts(n, vocab_size, seed=0):
    """n prompts of 3 to 6 ids, lengths mixed in one batch."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab_size) for _ in range(rng.randint(3, 6))] for _ in range(n)]


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
def test_batched_greedy_equals_one_at_a_time(spec):
    model = spec.build(seed=1, tie_embeddings=False).eval()
    prompts = random_prompts(7, model.cfg.vocab_size)
    batched = common.generate(model, prompts, 6, eot_id=0)
    alone = [common.generate(model, [p], 6, eot_id=0)[0] for p in prompts]
    assert batched == alone
    assert {len(p) for p in prompts} == {3, 4, 5, 6}  # the batch really mixed lengths


def test_eos_stops_each_sequence_and_masks_its_completion():
    model = GPT2.build(seed=1, tie_embeddings=False).eval()
    prompts = [p for p in random_prompts(40, model.cfg.vocab_size, seed=3) if len(p) == 4][:6]  # one batch
    free = common.generate(model, prompts, 8, eot_id=model.cfg.vocab_size - 1)  # an id it never emits here
    assert all(len(c) == 8 for c in free)
    eot = free[0][2]  # row 0 emits this third: with it as EOT, row 0 stops there, the others decode on
    stopped = common.generate(model, prompts, 8, eot_id=eot)
    for before, after in zip(free, stopped):
        end = before.index(eot) + 1 if eot in before else len(before)
        assert after == before[:end]  # the same tokens, cut after the first EOT
    assert len(stopped[0]) == 3 and any(len(c) == 8 for c in stopped)
    ids, mask = tasks.collate(prompts, stopped, pad_id=eot, device="cpu")
    for i, (p, c) in enumerate(zip(prompts, stopped)):
        assert mask[i].tolist() == [0.0] * len(p) + [1.0] * len(c) + [0.0] * (ids.size(1) - len(p) - len(c))
        assert ids[i, len(p) : len(p) + len(c)].tolist() == c


def test_sequence_logps_are_the_sampled_tokens_logprobs():
    model = GPT2.build(seed=2)
    prompts = random_prompts(3, model.cfg.vocab_size)
    completions = [[5, 6], [7], [8, 9, 10]]
    ids, mask = tasks.collate(prompts, completions, pad_id=0, device="cpu")
    logps = common.sequence_logps(model, ids, mask)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        alone = torch.tensor([p + c])
        logits = model(alone[:, :-1])[0].log_softmax(-1)[0]  # (L-1, vocab) for one unpadded sequence
        expected = [logits[len(p) - 1 + j, t].item() for j, t in enumerate(c)]
        got = logps[i][mask[i] == 1].tolist()
        assert got == pytest.approx(expected, abs=1e-5)
    assert (logps[mask == 0] == 0).all()
    hot = common.sequence_logps(model, ids, mask, temperature=2.0)  # the rollout's distribution: logits / T
    for i, (p, c) in enumerate(zip(prompts, completions)):
        logits = (model(torch.tensor([p + c])[:, :-1])[0] / 2.0).log_softmax(-1)[0]
        expected = [logits[len(p) - 1 + j, t].item() for j, t in enumerate(c)]
        assert hot[i][mask[i] == 1].tolist() == pytest.approx(expected, abs=1e-5)


def test_loss_counts_completion_tokens_only():
    model = GPT2.build(seed=2)
    prompts = random_prompts(4, model.cfg.vocab_size)
    completions = [[5, 6], [7], [8, 9, 10], [11]]
    ids, mask = tasks.collate(prompts, completions, pad_id=0, device="cpu")
    inputs, targets = ids[:, :-1], sft.completion_targets(ids, mask)
    n = (targets != -100).sum()
    loss = sft.sft_loss(model, inputs, targets, n)
    # other prompt tokens as targets (the inputs unchanged): the same loss
    other_prompts = ids.masked_fill(mask == 0, 3)
    assert sft.sft_loss(model, inputs, sft.completion_targets(other_prompts, mask), n).item() == loss.item()
    # another completion token: another loss
    other_completion = ids.clone()
    other_completion[0, len(prompts[0])] = 4
    assert sft.sft_loss(model, inputs, sft.completion_targets(other_completion, mask), n).item() != loss.item()
    # and it is the mean cross-entropy of exactly the completion tokens
    logp = model(inputs)[0].log_softmax(-1)
    expected = -sum(
        logp[i, len(p) - 1 + j, t] for i, (p, c) in enumerate(zip(prompts, completions)) for j, t in enumerate(c)
    )
    assert loss.item() == pytest.approx(expected.item() / n.item(), rel=1e-5)


def sft_args(out_dir, *extra):
    """A few seconds of SFT of the registry's small GPT-2 (the task vocabulary) on the reverse task."""
    return [str(a) for a in [
        "--model", "gpt2", "--init-from", "none", "--out-dir", out_dir, "--device", "cpu", "--steps", "2", "--batch-size", "4",
        "--eval-prompts", "4", "--eval-every", "0", "--max-new-tokens", "4", "--lr", "1e-2", "--warmup-steps", "1",
        "--log-every", "1", *extra,
    ]]  # fmt: skip


def test_short_run_lowers_loss_and_its_checkpoints_reload(tmp_path):
    rows = sft.main(sft_args(tmp_path, "--steps", "20", "--batch-size", "16"))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]  # ln(131) = 4.9 at first, soon near ln(26) = 3.3: completions are letters
    ckpt = common.load_checkpoint(GPT2, tmp_path / "ckpt.pt")
    exported = GPT2.model.Transformer.from_pretrained(tmp_path / "hf")
    idx = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(ckpt(idx)[0], exported(idx)[0])
    # train.py samples from it with the tokenizer.json saved beside it: the same ckpt.pt format, optimizer state included
    sets = [f"--set={k}={v}" for k, v in {**GPT2.small, "vocab_size": 131}.items()]
    sample = [
        "--generate",
        "--out-dir",
        str(tmp_path),
        "--tokenizer",
        str(tmp_path),
        "--prompt",
        " a",
        "--device",
        "cpu",
    ]
    GPT2.train.main([*sets, *sample, "--sample-tokens", "3"])
    # and the next post-training file starts from it, reading that tokenizer.json by default
    again = sft.main(sft_args(tmp_path / "again", "--init-from", tmp_path, "--steps", "1", "--reward", "partial"))
    settings = torch.load(tmp_path / "again" / "ckpt.pt", weights_only=True)["meta"]["settings"]
    assert settings["tokenizer"] == str(tmp_path)
    held_out = [r for r in again if "eval_reward" in r]
    assert all(0 <= r["eval_exact_match"] <= r["eval_reward"] <= 1 for r in held_out)  # both are reported


def test_partial_credit_counts_the_answers_words_in_place():
    assert tasks.words_in_place(" t a c", " t a c") == 1.0
    assert tasks.words_in_place(" t a x", " t a c") == pytest.approx(2 / 3)
    assert tasks.words_in_place(" t a c x", " t a c") == pytest.approx(3 / 4)  # an extra word costs as a wrong one
    assert tasks.words_in_place(" a c", " t a c") == 0.0  # right words in the wrong places earn nothing
    assert tasks.words_in_place("", " t a c") == 0.0
    examples = tasks.Examples(sft.parse_args(["--reward", "partial", "--eval-prompts", "2"]))
    prompt = examples.eval_prompts[0]
    words = examples.answer(prompt).split()
    last_wrong = " " + " ".join(words[:-1] + ["?"])
    assert examples.reward([prompt] * 3, ["", last_wrong, " " + " ".join(words)]) == pytest.approx(
        [0.0, 1 - 1 / len(words), 1.0]
    )


def test_task_vocabulary_round_trips_the_tasks_and_reloads_from_its_file(tmp_path):
    vocab = tasks.task_vocabulary()
    rng = random.Random(0)
    texts = [
        text
        for task in tasks.TASKS.values()
        for p in (task.make(rng) for _ in range(50))
        for text in (p, task.solve(p))
    ]
    assert all(vocab.decode(vocab.encode(text)) == text for text in texts)
    assert all(len(vocab.encode(text)) == len(text.split()) for text in texts)  # a word and its space: one id
    common.save_tokenizer(vocab, tmp_path)
    reloaded = load_tokenizer(str(tmp_path))  # shared/tokenizer.py reads the saved tokenizer.json
    assert (reloaded.vocab_size, reloaded.eot_id) == (vocab.vocab_size, vocab.eot_id) == (131, 0)
    assert [reloaded.encode(text) for text in texts] == [vocab.encode(text) for text in texts]


def test_default_tokenizer_is_the_one_the_policy_was_trained_with(tmp_path):
    def chosen(*argv):
        args = sft.parse_args(list(argv))
        common.open_tokenizer(args)
        return args.tokenizer

    assert chosen("--init-from", "none") == "task"  # a fresh model on a toy task
    assert chosen("--init-from", "none", "--data", "pairs.jsonl") == "gpt2"  # --data's text is any text
    with pytest.raises(SystemExit, match="--tokenizer task: holds only the toy tasks' words"):
        chosen("--init-from", "none", "--data", "pairs.jsonl", "--tokenizer", "task")
    (tmp_path / "ckpt.pt").write_bytes(b"")  # a checkpoint with no tokenizer.json beside it: GPT-2's
    assert chosen("--init-from", str(tmp_path)) == "gpt2"
    common.save_tokenizer(tasks.task_vocabulary(), tmp_path)
    assert chosen("--init-from", str(tmp_path)) == chosen("--init-from", str(tmp_path / "ckpt.pt")) == str(tmp_path)
    common.save_tokenizer(load_tokenizer("gpt2"), tmp_path)  # a GPT-2 run over it removes the stale file
    assert chosen("--init-from", str(tmp_path)) == "gpt2"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, parallel):
    one = sft.main(sft_args(tmp_path / "one"))
    main_on_ranks(sft.main, *sft_args(tmp_path / "two", "--parallel", parallel))
    two = metrics(tmp_path / "two")
    assert [r["loss"] for r in two if "loss" in r] == pytest.approx([r["loss"] for r in one if "loss" in r], rel=1e-5)
    assert [r["eval_reward"] for r in two if "eval_reward" in r] == [
        r["eval_reward"] for r in one if "eval_reward" in r
    ]


def test_completion_part_aligns_each_completion_at_column_zero():
    ids, mask = tasks.collate([[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11], [12]], pad_id=0, device="cpu")
    assert common.completion_part(ids.float(), mask).tolist() == [[7, 8, 0], [9, 10, 11], [12, 0, 0]]
    assert common.completion_part(mask, mask).tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]


def test_sampling_follows_temperature_and_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    drawn = common.sample_next(logits, 1.0, None, generators)
    frequencies = torch.bincount(drawn, minlength=4) / 4000
    assert frequencies.tolist() == pytest.approx(torch.softmax(logits[0], -1).tolist(), abs=0.03)
    assert set(common.sample_next(logits, 1.0, 2, generators).tolist()) == {0, 1}  # top-k 2: never the others
    cold = torch.bincount(common.sample_next(logits, 0.25, None, generators), minlength=4) / 4000
    assert cold[0] > 0.95  # temperature 1/4 sharpens the distribution
    assert torch.equal(common.sample_next(logits[:3], 1.0, None, generators[:3]), drawn[:3])  # seeds per row


def test_a_run_repeats_on_any_thread_count_and_global_seed(tmp_path):
    """Set-up fixes torch's CPU threads (--threads, 1 by default, whatever OMP_NUM_THREADS gave) and seeds the
    global RNG from --seed: a run from a saved policy (no fresh model's seeding) saved a different meta.rng
    each time before, and a thread count that followed the machine changed the reduction order."""
    sft.main(sft_args(tmp_path / "policy", "--steps", "1"))
    threads = torch.get_num_threads()
    try:
        rng = []
        for i in range(2):
            torch.set_num_threads(2)
            torch.seed()  # whatever state the process was in
            out = tmp_path / f"run{i}"
            sft.main(sft_args(out, "--init-from", tmp_path / "policy", "--steps", "1"))
            assert torch.get_num_threads() == 1
            rng.append(torch.load(out / "ckpt.pt", weights_only=True)["meta"]["rng"]["cpu"])
        assert torch.equal(*rng)
        rows = [
            [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(tmp_path / f"run{i}")]
            for i in range(2)
        ]
        assert rows[0] == rows[1]
    finally:
        torch.set_num_threads(threads)
