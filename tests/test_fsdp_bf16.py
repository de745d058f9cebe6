"""bf16 under FSDP2 on 2 gloo ranks: train, checkpoint and sample, as the README's GPU command does.
FSDP keeps fp32 master weights and gathers them in bf16 for each forward, so generation meets a
model whose stored parameters (fp32) and computed activations (bf16) differ in dtype: the KV cache
must take the dtype of the keys and values it is given, not that of the parameters."""

import pytest
import torch

from registry import MODELS, randomize_
from train_helpers import losses, metrics, run_ranks, train_args


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
def test_fsdp_bf16_trains_checkpoints_and_samples(spec, toy_data, tmp_path):
    args = train_args(spec, toy_data, tmp_path, "--max-steps", 2, "--dtype", "bfloat16", "--parallel", "fsdp")
    run_ranks(spec, *args, "--sample-tokens", 5, "--prompt", "!")
    assert (tmp_path / "ckpt_dcp" / "meta.pt").exists()
    assert len(losses(metrics(tmp_path))) == 2


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
@pytest.mark.parametrize("mode", ["plain bf16", "autocast"])
def test_generate_in_bf16(spec, mode, monkeypatch):
    """Greedy decoding with bf16 weights, and with fp32 weights under bf16 autocast: the cache holds
    what attention computes in, and the tokens are those of the full forward's argmax."""
    given = set()  # the dtypes of the activations the model hands its caches
    update = spec.model.KVCache.update

    def recorded(cache, pos, *activations):
        given.update(a.dtype for a in activations)
        return update(cache, pos, *activations)

    monkeypatch.setattr(spec.model.KVCache, "update", recorded)
    model = randomize_(spec.build()).eval()
    if mode == "plain bf16":
        model.to(torch.bfloat16)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = model.generate(idx, 4, temperature=0)
        with torch.no_grad():
            logits, _ = model(out[:, :-1])
            cache = model.make_cache(2, 5)
            model(idx, cache=cache)
    # every buffer takes the dtype of what it is given, never the parameters' (fp32 under autocast): bf16,
    # which every model's values come in straight from a matmul, and in qwen3 also fp32 for the keys,
    # which its QK-norm's fp32 gain promotes under autocast, as transformers' does
    stored = {buffer.dtype for c in cache for buffer in c.buffers()}
    assert stored == given and torch.bfloat16 in stored
    assert out.shape == (2, 9)
    assert torch.equal(out[:, 5:], logits[:, 4:].argmax(-1))
