"""Hugging Face parity: the same random weights give the same logits in both directions, and a
checkpoint saved in shards loads back in both."""

import importlib
import json

import pytest
import torch

from registry import MODELS, VARIANTS, hf_from_pretrained, import_transformers, randomize_

transformers = import_transformers()  # skipped without it, except in CI


def hf_model(spec, seed=0):
    cls = getattr(transformers, spec.hf_class)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**spec.hf_config)).eval()
    randomize_(model, seed)
    return model


def hf_format(spec):
    """The model's hf.py: config.json and weight-name conversion."""
    return importlib.import_module(f"{spec.package}.hf")


def random_ids(vocab_size, seq_len, batch=2, seed=1):
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", MODELS + VARIANTS, ids=lambda s: s.name)
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


@pytest.mark.parametrize("spec", MODELS + VARIANTS, ids=lambda s: s.name)
def test_ours_to_hf(spec, tmp_path):
    config = hf_format(spec).config_from_hf(hf_model(spec).config.to_dict())
    ours = spec.model.Transformer(config).eval()
    randomize_(ours, seed=3)
    ours.save_pretrained(tmp_path)
    theirs = hf_from_pretrained(spec.hf_class, tmp_path).eval()
    idx = random_ids(config.vocab_size, spec.parity_seq_len)
    with torch.no_grad():
        expected, _ = ours(idx)
        got = theirs(idx).logits
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("spec", MODELS + VARIANTS, ids=lambda s: s.name)
def test_sharded_save_loads_back_in_both(spec, tmp_path):
    config = hf_format(spec).config_from_hf(hf_model(spec).config.to_dict())
    ours = spec.model.Transformer(config).eval()
    randomize_(ours, seed=4)
    ours.save_pretrained(tmp_path, max_shard_bytes=20_000)  # a few tensors per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and shards == sorted(set(index["weight_map"].values()))
    assert (
        shards[0] == f"model-00001-of-{len(shards):05d}.safetensors" and not (tmp_path / "model.safetensors").exists()
    )
    reloaded = spec.model.Transformer.from_pretrained(tmp_path)
    expected = ours.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items())
    theirs = hf_from_pretrained(spec.hf_class, tmp_path).eval()
    idx = random_ids(config.vocab_size, spec.parity_seq_len)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], rtol=0, atol=1e-4)
    # saved again unsharded into the same directory: one file, the shards and index removed
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]
    assert all(
        torch.equal(v, expected[k]) for k, v in spec.model.Transformer.from_pretrained(tmp_path).state_dict().items()
    )
