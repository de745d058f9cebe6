"""Hugging Face parity: the same random weights give the same logits in both directions."""

import pytest
import torch

from registry import MODELS

transformers = pytest.importorskip("transformers")


def randomize_(model, seed=0, std=0.1):
    """Replace the default init (tiny weights, unit norms) with values that expose any mismatch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm_gain = ("norm" in name or "ln" in name) and name.endswith("weight") and p.dim() == 1
            p.copy_(1.0 + 0.2 * noise if is_norm_gain else std * noise)


def hf_model(spec, seed=0):
    cls = getattr(transformers, spec.hf_class)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**spec.hf_config)).eval()
    randomize_(model, seed)
    return model


def random_ids(vocab_size, seq_len, batch=2, seed=1):
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_hf_to_ours(spec, attn_impl, tmp_path):
    theirs = hf_model(spec)
    theirs.save_pretrained(tmp_path)
    ours = spec.model.Transformer.from_pretrained(tmp_path, attn_impl=attn_impl).eval()
    idx = random_ids(ours.cfg.vocab_size, spec.parity_seq_len)
    with torch.no_grad():
        expected = theirs(idx).logits
        got, _ = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
def test_ours_to_hf(spec, tmp_path):
    config = spec.model.Config.from_hf(hf_model(spec).config.to_dict())
    ours = spec.model.Transformer(config).eval()
    randomize_(ours, seed=3)
    ours.save_pretrained(tmp_path)
    theirs = getattr(transformers, spec.hf_class).from_pretrained(tmp_path).eval()
    idx = random_ids(config.vocab_size, spec.parity_seq_len)
    with torch.no_grad():
        expected, _ = ours(idx)
        got = theirs(idx).logits
    assert (got - expected).abs().max().item() <= 1e-4
