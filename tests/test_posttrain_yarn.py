"""posttrain/yarn.py: a short CPU run of the recipe (tiny sizes, seconds): the fine-tuned YaRN model
beats the original one extrapolating at 4T, and its checkpoint reloads with its scaling."""

import torch

from registry import by_name

TINY = ["--context", "48", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--batch-tokens", "768"]
TINY += ["--base-steps", "120", "--finetune-steps", "30", "--eval-windows", "6", "--passkeys", "4"]


def test_extended_checkpoint_reloads_and_beats_extrapolation(tmp_path):
    from posttrain import yarn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    try:
        rows, tuned = yarn.main(["--model", "qwen3", "--out-dir", str(tmp_path), *TINY])
    finally:
        torch.set_num_threads(threads)
    loss_4t = 2  # columns: loss at T, 2T, 4T, then passkey accuracy at T, 2T, 4T
    assert rows["(d) YaRN, fine-tuned"][loss_4t] < rows["(a) original, extrapolating"][loss_4t]

    reloaded = by_name("qwen3").model.Transformer.from_pretrained(tmp_path / "yarn").eval()
    assert reloaded.cfg == tuned.cfg and reloaded.cfg.rope_type == "yarn" and reloaded.cfg.rope_factor == 4.0
    assert reloaded.cfg.rope_original_block_size == 48
    idx = torch.randint(0, tuned.cfg.vocab_size, (1, 4 * 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(idx)[0], tuned(idx)[0])
