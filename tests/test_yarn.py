"""YaRN RoPE (Peng et al., 2023) in every model that has it: the properties of its frequency
interpolation, its config.json spellings, and the context-extension recipe of posttrain/yarn.py.
Parity with transformers runs in tests/test_parity.py over the registry's yarn variants."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from registry import VARIANTS, by_name

PACKAGES = sorted({v.package for v in VARIANTS})  # the models with YaRN
packages = pytest.mark.parametrize("package", PACKAGES)


def model_module(package):
    return by_name(package).model


def rope_config(package, head_dim, **rope):
    """A one-head Config of the given head_dim and RoPE fields (rope tables only: 32 positions)."""
    sizes = dict(vocab_size=11, block_size=32, n_layer=1, n_head=1, n_kv_heads=1, n_embd=head_dim)
    if package == "qwen3":
        sizes["head_dim"] = head_dim
    return model_module(package).Config(**sizes, intermediate_size=8, **rope)


yarn_fields = st.fixed_dictionaries(
    dict(
        rope_theta=st.floats(100.0, 1e6),
        rope_original_block_size=st.integers(8, 1 << 17),
        rope_factor=st.floats(1.0, 64.0),
        rope_beta_fast=st.floats(1.0, 64.0),
        rope_beta_slow=st.floats(0.01, 1.0),
        rope_truncate=st.booleans(),
    )
)


@packages
@settings(max_examples=30, deadline=None)
@given(head_dim=st.sampled_from([4, 8, 16, 64, 128]), rope=yarn_fields)
def test_frequencies_outside_the_ramp_are_kept_or_divided_exactly(package, head_dim, rope):
    """r_i = L / wavelength_i turns over the original context L: above beta_fast a frequency is
    untouched, below beta_slow it is divided by the factor, bit for bit; in between it lies between."""
    cfg = SimpleNamespace(head_dim=head_dim, rope_attention_factor=None, **rope)
    # the reference clamps the ramp's upper end to head_dim - 1; where even beta_fast's index lies past
    # that (no real config: the slowest frequency would turn > beta_fast times), its ramp inverts
    L, theta = cfg.rope_original_block_size, cfg.rope_theta
    assume(head_dim * math.log(L / (2 * math.pi * cfg.rope_beta_fast)) / (2 * math.log(theta)) < head_dim - 1)
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaled, attention_factor = model_module(package).yarn_scaling(plain, cfg)
    turns = cfg.rope_original_block_size * plain.double() / (2 * math.pi)
    fast, slow = turns > cfg.rope_beta_fast, turns < cfg.rope_beta_slow
    assert torch.equal(scaled[fast], plain[fast])
    assert torch.equal(scaled[slow], plain[slow] / cfg.rope_factor)
    between = ~fast & ~slow
    assert (scaled[between] <= plain[between] * (1 + 1e-6)).all()
    assert (scaled[between] >= plain[between] / cfg.rope_factor * (1 - 1e-6)).all()
    assert (scaled[1:] <= scaled[:-1]).all()  # still ordered: no frequency overtakes a faster one
    assert attention_factor == pytest.approx(0.1 * math.log(cfg.rope_factor) + 1)


@packages
@settings(max_examples=20, deadline=None)
@given(head_dim=st.sampled_from([4, 8, 16, 64]), rope=yarn_fields)
def test_factor_one_is_plain_rope(package, head_dim, rope):
    precompute_rope = model_module(package).precompute_rope
    yarn = rope_config(package, head_dim, **{**rope, "rope_factor": 1.0}, rope_type="yarn")
    plain = rope_config(package, head_dim, rope_theta=rope["rope_theta"], rope_factor=None)
    for got, expected in zip(precompute_rope(yarn), precompute_rope(plain)):
        # equal up to rounding: the blend inv_freq * (1 - ramp) + inv_freq / 1 * ramp may be 1 ulp off,
        # and an angle of up to 31 radians carries that as ~2e-6 (its ulp); a real scaling moves it by >> 1e-3
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@packages
def test_tables_are_scaled_by_the_attention_factor(package):
    """cos and sin carry the temperature sqrt(1/t) = 0.1 ln(s) + 1 (sec. 3.4), or attention_factor."""
    precompute_rope = model_module(package).precompute_rope
    rope = dict(rope_type="yarn", rope_factor=8.0, rope_original_block_size=16, rope_theta=10000.0)
    cos, sin = precompute_rope(rope_config(package, 8, **rope))
    assert torch.allclose(cos.square() + sin.square(), torch.tensor((0.1 * math.log(8.0) + 1) ** 2))
    cos, sin = precompute_rope(rope_config(package, 8, **rope, rope_attention_factor=0.7))
    assert torch.allclose(cos.square() + sin.square(), torch.tensor(0.49))
    assert torch.equal(cos[0], torch.full((8,), 0.7))  # position 0: angle 0 for every frequency


# -----------------------------------------------------------------------------
# config.json: both spellings, transformers' defaults, what is rejected

# Qwen's model cards: add this to config.json for 128K (transformers 4.x spelling)
QWEN_CARD = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def hf_config(package, **rope_keys):
    base = dict(vocab_size=101, max_position_embeddings=131072, num_hidden_layers=2, hidden_size=64)
    base.update(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, rope_theta=1e6)
    return dict(base, model_type="qwen3" if package == "qwen3" else "llama", **rope_keys)


@packages
@pytest.mark.parametrize(
    "spelling",
    [
        dict(rope_scaling=QWEN_CARD),  # transformers 4.x
        dict(rope_scaling={**QWEN_CARD, "type": "yarn"}),
        dict(rope_scaling={k: v for k, v in QWEN_CARD.items() if k != "rope_type"} | {"type": "yarn"}),  # oldest
        dict(rope_parameters={**QWEN_CARD, "rope_theta": 1e6}, rope_theta=None),  # transformers >= 5
    ],
    ids=["rope_scaling+rope_type", "both keys", "rope_scaling+type", "rope_parameters"],
)
def test_config_json_spellings_read_the_same(package, spelling):
    hf = by_name(package).hf
    cfg = hf.config_from_hf(hf_config(package, **spelling))
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_block_size, cfg.rope_theta) == ("yarn", 4.0, 32768, 1e6)
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_attention_factor, cfg.rope_truncate) == (32, 1, None, True)
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


@packages
def test_config_json_round_trips_every_field(package):
    hf = by_name(package).hf
    rope = dict(rope_type="yarn", rope_factor=3.0, rope_original_block_size=512, rope_beta_fast=16.0)
    rope.update(rope_beta_slow=0.5, rope_attention_factor=1.5, rope_truncate=False)
    cfg = rope_config(package, 16, **rope)
    written = hf.config_to_hf(cfg)["rope_parameters"]
    assert written == dict(
        rope_type="yarn",
        rope_theta=cfg.rope_theta,
        factor=3.0,
        original_max_position_embeddings=512,
        beta_fast=16.0,
        beta_slow=0.5,
        attention_factor=1.5,
        truncate=False,
    )
    again = hf.config_from_hf(hf.config_to_hf(cfg))
    assert {f: getattr(again, f) for f in rope} == rope


@packages
def test_config_json_defaults_follow_transformers(package):
    hf = by_name(package).hf
    # no original context: the whole max_position_embeddings (transformers' standardize_rope_params);
    # no factor: their ratio; a top-level original_max_position_embeddings wins (Phi-3's spelling)
    cfg = hf.config_from_hf(hf_config(package, rope_scaling={"type": "yarn", "factor": 2.0}))
    assert (cfg.rope_factor, cfg.rope_original_block_size) == (2.0, 131072)
    top = hf_config(package, rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 4096})
    assert hf.config_from_hf(top).rope_factor == 32.0
    top["original_max_position_embeddings"] = 8192
    assert (hf.config_from_hf(top).rope_original_block_size, hf.config_from_hf(top).rope_factor) == (8192, 16.0)
    with pytest.raises(ValueError, match="mscale"):
        hf.config_from_hf(hf_config(package, rope_scaling={**QWEN_CARD, "mscale": 1.0, "mscale_all_dim": 1.0}))


@packages
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rope_type", "linear", "Config.rope_type must be"),
        ("rope_beta_slow", 64.0, "Config.rope_beta_slow .* at most Config.rope_beta_fast"),
        ("rope_beta_slow", 0.0, "Config.rope_beta_slow"),
        ("rope_attention_factor", 0.0, "Config.rope_attention_factor"),
        ("rope_factor", -2.0, "Config.rope_factor"),
        ("rope_original_block_size", 0, "Config.rope_original_block_size"),
    ],
)
def test_bad_yarn_fields_are_named(package, field, value, message):
    with pytest.raises(ValueError, match=message):
        rope_config(package, 8, **{"rope_type": "yarn", "rope_factor": 4.0, field: value})
