"""YaRN RoPE (Peng et al., 2023) in every model that has it: the properties of its frequency
interpolation, its config.json spellings, and the context-extension recipe of posttrain/yarn.py.
Parity with transformers runs in tests/test_parity.py over the registry's yarn variants."""

import math
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class AttentionFactor:
    """How a model's Config and config.json spell YaRN's attention factor (the temperature on cos and
    sin): one attention_factor, or DeepSeek's pair, whose ratio mscale(s, mscale) / mscale(s, mscale_all_dim) with mscale(s, m) = 0.1 m ln(s) + 1 reaches
    cos and sin (mscale_all_dim also scales the softmax: tests/test_deepseek3.py, parity's
    deepseek3_yarn variant)."""

    unset: dict  # Config fields when config.json gives none: YaRN's own 0.1 ln(s) + 1
    given: dict  # Config fields that set it ...
    given_hf: dict  # ... as config.json's rope keys
    at: Callable[[float], float]  # ... and the factor they give at scaling s
    bad: tuple  # (Config field, a value it refuses)
    foreign_hf: dict  # the other spelling in config.json: refused by name, not misread
    foreign_name: str


SINGLE = AttentionFactor(
    unset=dict(rope_attention_factor=None),
    given=dict(rope_attention_factor=0.7),
    given_hf=dict(attention_factor=0.7),
    at=lambda s: 0.7,
    bad=("rope_attention_factor", 0.0),
    foreign_hf=dict(mscale=1.0, mscale_all_dim=1.0),
    foreign_name="mscale",
)
DEEPSEEK = AttentionFactor(
    unset=dict(rope_mscale=0.0, rope_mscale_all_dim=0.0),  # 0: absent from config.json, as transformers reads it
    given=dict(rope_mscale=0.5, rope_mscale_all_dim=1.0),
    given_hf=dict(mscale=0.5, mscale_all_dim=1.0),
    at=lambda s: (0.05 * math.log(s) + 1) / (0.1 * math.log(s) + 1),
    bad=("rope_mscale", -1.0),
    foreign_hf=dict(attention_factor=1.0),
    foreign_name="attention_factor",
)
ATTENTION_FACTOR = {"llama31": SINGLE, "qwen3": SINGLE, "deepseek3": DEEPSEEK}
MLA = {"deepseek3"}  # multi-head latent attention: RoPE turns only the qk_rope_head_dim decoupled dims


def rope_config(package, head_dim, **rope):
    """A one-head Config whose RoPE turns head_dim dims, with the given RoPE fields (rope tables only:
    32 positions)."""
    sizes = dict(vocab_size=11, block_size=32, n_layer=1, n_head=1, n_embd=head_dim)
    if package in MLA:
        sizes["qk_rope_head_dim"] = head_dim
    else:
        sizes["n_kv_heads"] = 1
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
    rotated = "qk_rope_head_dim" if package in MLA else "head_dim"
    cfg = SimpleNamespace(**{rotated: head_dim}, **ATTENTION_FACTOR[package].unset, **rope)
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
    """cos and sin carry the temperature sqrt(1/t) = 0.1 ln(s) + 1 (sec. 3.4), or the factor the
    config gives (attention_factor, or DeepSeek's mscale pair)."""
    precompute_rope, factor = model_module(package).precompute_rope, ATTENTION_FACTOR[package]
    rope = dict(rope_type="yarn", rope_factor=8.0, rope_original_block_size=16, rope_theta=10000.0)
    cos, sin = precompute_rope(rope_config(package, 8, **rope, **factor.unset))
    assert torch.allclose(cos.square() + sin.square(), torch.tensor((0.1 * math.log(8.0) + 1) ** 2))
    cos, sin = precompute_rope(rope_config(package, 8, **rope, **factor.given))
    assert factor.at(8.0) != pytest.approx(0.1 * math.log(8.0) + 1, abs=0.1)  # a factor of its own
    assert torch.allclose(cos.square() + sin.square(), torch.tensor(factor.at(8.0) ** 2))
    assert torch.equal(cos[0], torch.full_like(cos[0], factor.at(8.0)))  # position 0: angle 0 for every frequency


# -----------------------------------------------------------------------------
# config.json: both spellings, transformers' defaults, what is rejected

# Qwen's model cards: add this to config.json for 128K (transformers 4.x spelling)
QWEN_CARD = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def hf_config(package, **rope_keys):
    base = dict(vocab_size=101, max_position_embeddings=131072, num_hidden_layers=2, hidden_size=64)
    base.update(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, rope_theta=1e6)
    if package in MLA:  # its latent and head sizes, no key/value heads; dense (as config_to_hf writes one)
        base.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
        base.update(num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=2)
    model_type = {"qwen3": "qwen3", "deepseek3": "deepseek_v3"}.get(package, "llama")
    return dict(base, model_type=model_type, **rope_keys)


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
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate) == (32, 1, True)
    unset = ATTENTION_FACTOR[package].unset
    assert {f: getattr(cfg, f) for f in unset} == unset
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


@packages
def test_config_json_round_trips_every_field(package):
    hf, factor = by_name(package).hf, ATTENTION_FACTOR[package]
    rope = dict(rope_type="yarn", rope_factor=3.0, rope_original_block_size=512, rope_beta_fast=16.0)
    rope.update(rope_beta_slow=0.5, **factor.given, rope_truncate=False)
    cfg = rope_config(package, 16, **rope)
    written = hf.config_to_hf(cfg)["rope_parameters"]
    assert written == dict(
        rope_type="yarn",
        rope_theta=cfg.rope_theta,
        factor=3.0,
        original_max_position_embeddings=512,
        beta_fast=16.0,
        beta_slow=0.5,
        **factor.given_hf,
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
    factor = ATTENTION_FACTOR[package]
    with pytest.raises(ValueError, match=factor.foreign_name):
        hf.config_from_hf(hf_config(package, rope_scaling={**QWEN_CARD, **factor.foreign_hf}))


@packages
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rope_type", "linear", "Config.rope_type must be"),
        ("rope_beta_slow", 64.0, "Config.rope_beta_slow .* at most Config.rope_beta_fast"),
        ("rope_beta_slow", 0.0, "Config.rope_beta_slow"),
        ("rope_factor", -2.0, "Config.rope_factor"),
        ("rope_original_block_size", 0, "Config.rope_original_block_size"),
    ],
)
def test_bad_yarn_fields_are_named(package, field, value, message):
    with pytest.raises(ValueError, match=message):
        rope_config(package, 8, **{"rope_type": "yarn", "rope_factor": 4.0, field: value})


@packages
def test_bad_attention_factor_is_named(package):
    field, value = ATTENTION_FACTOR[package].bad
    with pytest.raises(ValueError, match=f"Config.{field}"):
        rope_config(package, 8, **{"rope_type": "yarn", "rope_factor": 4.0, field: value})
