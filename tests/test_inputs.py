"""Presets and bad inputs: published sizes, and a clear error (naming the problem) for every
kind of bad input, instead of a bare traceback from deep inside torch."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from registry import MODELS, by_name

models = pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
presets = [(spec, name, count) for spec in MODELS for name, count in spec.presets.items()]


@pytest.mark.parametrize("spec,preset,published", presets, ids=[f"{s.name}-{p}" for s, p, _ in presets])
def test_preset_parameter_count(spec, preset, published):
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = spec.model.Transformer(spec.model.Config.from_preset(preset))
    assert model.num_params() == pytest.approx(published, rel=spec.preset_rel_tol)


@models
def test_every_preset_builds(spec):
    Config = spec.model.Config
    assert "tiny" in Config.PRESETS
    for name in Config.PRESETS:
        assert isinstance(Config.from_preset(name), Config)


@models
def test_unknown_preset(spec):
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        spec.model.Config.from_preset("gpt5")


@models
@pytest.mark.parametrize("field,value", [("n_layer", 0), ("vocab_size", -1), ("n_head", 0), ("norm_eps", 0.0)])
def test_invalid_config_names_the_field(spec, field, value):
    with pytest.raises(ValueError, match=f"Config.{field}"):
        spec.config(**{field: value})


@models
def test_invalid_attn_impl(spec):
    with pytest.raises(ValueError, match="Config.attn_impl"):
        spec.config(attn_impl="flash")


def test_gpt2_heads_must_divide_width():
    spec = by_name("gpt2")
    with pytest.raises(ValueError, match=r"n_embd \(32\) must be divisible by Config.n_head \(5\)"):
        spec.config(n_embd=32, n_head=5)


@models
def test_token_id_outside_vocabulary(spec):
    model = spec.build()
    vocab = model.cfg.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        model(torch.tensor([[0, vocab]]))
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
        model(torch.tensor([[-1, 0]]))


@models
def test_sequence_longer_than_the_model_supports(spec):
    model = spec.build()
    n = model.cfg.block_size
    with pytest.raises(ValueError, match=f"sequence of {n + 1} tokens .* longer than the model supports"):
        model(torch.zeros(1, n + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the model supports"):
        model(torch.zeros(1, 2, dtype=torch.long), pos=n - 1)  # a cached decode past the end
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), n)


@models
def test_wrong_index_dtype_or_shape(spec):
    model = spec.build()
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(3, dtype=torch.long))


def saved_with_config_change(spec, path, change):
    """Save spec's small model to path, then edit its config.json with change(config)."""
    spec.build().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    change(config, next(k for k in ("n_layer", "num_hidden_layers") if k in config))
    (path / "config.json").write_text(json.dumps(config))
    return config


def saved_without(spec, path, dropped):
    """Save spec's small model to path, then rewrite its weights without the tensors whose Hugging
    Face names dropped(name) picks."""
    spec.build().save_pretrained(path)
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            metadata = f.metadata()
        kept = {name: tensor for name, tensor in load_file(file).items() if not dropped(name)}
        save_file(kept, file, metadata=metadata)


@models
def test_checkpoint_with_missing_keys(spec, tmp_path):
    # the file loses the last main layer (transformer.h.N / model.layers.N): a config.json that merely
    # asks for one more layer would not do for every model, since DeepSeek-V3 saves its MTP module as
    # the layer after the main ones, which would then read as that extra main layer
    last_layer = spec.small["n_layer"] - 1
    saved_without(spec, tmp_path, re.compile(rf"(^|\.)(h|layers)\.{last_layer}\.").search)
    with pytest.raises(KeyError, match=rf"missing keys: \['layers\.{last_layer}\."):
        spec.model.Transformer.from_pretrained(tmp_path)


@models
def test_checkpoint_with_unexpected_keys(spec, tmp_path):
    saved_with_config_change(spec, tmp_path, lambda c, layers: c.update({layers: c[layers] - 1}))
    with pytest.raises(KeyError, match="unexpected keys"):
        spec.model.Transformer.from_pretrained(tmp_path)


@models
def test_checkpoint_with_mismatched_shapes(spec, tmp_path):
    saved_with_config_change(spec, tmp_path, lambda c, _: c.update(vocab_size=c["vocab_size"] + 1))
    with pytest.raises(KeyError, match="shape mismatches: .*tok_emb.weight"):
        spec.model.Transformer.from_pretrained(tmp_path)


@models
def test_directory_without_weights(spec, tmp_path):
    spec.build().save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        spec.model.Transformer.from_pretrained(tmp_path)


def test_llama_config_in_the_older_spelling_maps_to_the_preset():
    """Meta's published config.json (and transformers < 5) put rope_theta beside a rope_scaling dict."""
    from llama31.hf import config_from_hf, config_to_hf
    from llama31.model import Config

    published_8b = {
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    assert config_from_hf(published_8b) == Config.llama31_8b()
    assert config_from_hf(config_to_hf(Config.llama31_8b())) == Config.llama31_8b()
