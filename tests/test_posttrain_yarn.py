"""posttrain/yarn.py: a short CPU run of the recipe (tiny sizes, seconds): the fine-tuned YaRN model
beats the original one extrapolating at 4T, and its checkpoint reloads with its scaling; the passkey
harness scores the right answer 100% and a wrong digit 0%; 2 gloo ranks train as one process does."""

import json
import random
import re

import pytest
import torch

from registry import by_name
from train_helpers import fork_ranks, torchrun_environment

TINY = ["--context", "48", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--batch-tokens", "768"]
TINY += ["--base-steps", "120", "--finetune-steps", "30", "--eval-windows", "6", "--passkeys", "4"]
TINY += ["--lr", "3e-3", "--finetune-lr", "3e-4"]


def one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def test_extended_checkpoint_reloads_and_beats_extrapolation(tmp_path):
    from posttrain import yarn

    rows, tuned, _ = one_thread(yarn.main, ["--model", "qwen3", "--out-dir", str(tmp_path), *TINY])
    loss_4t = 2  # columns: loss at T, 2T, 4T, then passkey accuracy at T, 2T, 4T
    assert rows["(d) YaRN, fine-tuned"][loss_4t] < rows["(a) original, extrapolating"][loss_4t]

    reloaded = by_name("qwen3").model.Transformer.from_pretrained(tmp_path / "yarn").eval()
    assert reloaded.cfg == tuned.cfg and reloaded.cfg.rope_type == "yarn" and reloaded.cfg.rope_factor == 4.0
    assert reloaded.cfg.rope_original_block_size == 48
    idx = torch.randint(0, tuned.cfg.vocab_size, (1, 4 * 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(idx)[0], tuned(idx)[0])


class Reader:
    """Not a model: reads the stated key off the prompt's text and puts all its logit mass on that
    key's digits (each shifted by `shift`) at the last positions, where the answer is predicted."""

    def __init__(self, chars, shift):
        self.chars, self.shift = chars, shift

    def __call__(self, idx):
        from posttrain.yarn import KEY_DIGITS

        key = re.search(r"\[pass key (\d+)\]", self.chars.decode(idx[0].tolist())).group(1)
        logits = torch.zeros(1, idx.size(1), len(self.chars.chars))
        for j, digit in enumerate(key):
            guess = str((int(digit) + self.shift) % 10)
            logits[0, idx.size(1) - KEY_DIGITS + j, self.chars.index[guess]] = 1.0
        return logits, None


def test_passkey_harness_scores_the_answer_and_only_it():
    from posttrain import yarn

    text = yarn.SHAKESPEARE.read_text()[:20_000]
    chars = yarn.Chars(text)
    _, val = yarn.split_corpus(text, chars)
    for length in (48, 256):
        assert yarn.passkey_accuracy(Reader(chars, 0), val, chars, length, 20, "cpu") == 1.0
        assert yarn.passkey_accuracy(Reader(chars, 1), val, chars, length, 20, "cpu") == 0.0
    # evaluation keys are never drawn in training
    rng = random.Random(0)
    train_keys = {chars.decode(yarn.passkey(val, chars, 48, rng)[0].tolist()) for _ in range(3000)}
    keys = {int(re.search(r"\[pass key (\d+)\]", t).group(1)) for t in train_keys}
    assert not keys & yarn.EVAL_KEY_SET


DDP = ["--model", "llama31", "--context", "48", "--factor", "2", "--n-layer", "1", "--n-embd", "16"]
DDP += ["--base-steps", "3", "--finetune-steps", "2", "--batch-tokens", "192", "--eval-windows", "3"]
DDP += ["--passkeys", "3", "--passkey-frac", "0.5"]


def _yarn_rank(rank, world_size, port, args, result):
    torchrun_environment(rank, world_size, port)
    import torch.distributed as dist

    from posttrain import yarn

    rows, _, history = yarn.main(args)
    if rank == 0:
        result.write_text(json.dumps({"rows": rows, "history": history}))
    dist.destroy_process_group()


def test_two_gloo_ranks_train_and_evaluate_as_one_process(tmp_path):
    from posttrain import yarn

    rows, _, history = one_thread(yarn.main, [*DDP, "--out-dir", str(tmp_path / "one")])
    result = tmp_path / "ranks.json"
    fork_ranks(_yarn_rank, [*DDP, "--out-dir", str(tmp_path / "two")], result)
    two = json.loads(result.read_text())
    for stage in ("base", "finetune"):
        assert two["history"][stage] == pytest.approx(history[stage], rel=1e-5)
    for name, row in rows.items():
        assert two["rows"][name] == pytest.approx(row, rel=1e-5, abs=1e-6)
    assert (tmp_path / "two" / "yarn" / "config.json").exists()
