"""Kimi K2 (issue #11): DeepSeek-V3's architecture at K2's shape. The config.json Moonshot publishes
reads into the kimi_k2 preset, whose parameter count is the published weights'; save writes K2's
layout back (model_type kimi_k2, the 4.x rope spelling); an FP8 checkpoint in that layout loads
dequantised; K2's YaRN (beta_fast = beta_slow = 1) matches transformers' DeepseekV3ForCausalLM; and
kimi_k2/model.py and hf.py differ from deepseek3's only in Config and the config.json spelling."""

import importlib
import inspect
import json
from dataclasses import replace

import pytest
import torch

from kimi_k2 import hf
from kimi_k2.model import Config, Transformer
from registry import hf_from_pretrained, import_transformers, randomize_
from test_deepseek3_checkpoints import QUANTIZED, dequantize_blocks, quantize_blocks

# moonshotai/Kimi-K2-Instruct's config.json, as published
PUBLISHED = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}
# Moonshot's weight files hold 1,026,470,731,056 numbers: the model's parameters plus, per FP8 matrix,
# one float32 scale per 128 x 128 block (62,495,192 in all) and the 61 layers' 56-entry rotary_emb.inv_freq
PUBLISHED_NUMBERS = 1_026_470_731_056
FP8_SCALES = 61 * (5 * 56 + 128 * 4 + 56 * 64 + 12 * 56 + 96 * 12) + 3 * 144 * 56 + 60 * 385 * 3 * 16 * 56
INV_FREQ = 61 * 56


def test_the_published_config_json_reads_as_the_kimi_k2_preset():
    assert hf.config_from_hf(PUBLISHED) == Config.from_preset("kimi_k2")


def test_the_kimi_k2_preset_has_the_published_weights_parameter_count():
    with torch.device("meta"):
        model = Transformer(Config.from_preset("kimi_k2"))
    assert model.num_params() == PUBLISHED_NUMBERS - FP8_SCALES - INV_FREQ == 1_026_408_232_448  # "1.04T"
    idle_experts = 60 * (384 - 8) * 3 * 2048 * 7168  # each MoE layer's routed experts a token skips
    assert model.num_params(active=True) == model.num_params() - idle_experts == 32_861_500_928
    # the report rounds both: 1.04T total (1.3% above), 32.6B active (0.8% below)
    assert model.num_params() == pytest.approx(1.04e12, rel=0.015)
    assert model.num_params(active=True) == pytest.approx(32.6e9, rel=0.01)


def test_config_to_hf_writes_the_published_layout_back():
    written = hf.config_to_hf(Config.from_preset("kimi_k2"))
    assert "rope_parameters" not in written and "rope_interleave" not in written
    # every field written is the published one's value; the published fields left out are the
    # tokenizer's ids, the remote code's unused training knobs and the FP8 quantisation of weights
    # that save writes unquantised
    assert {k: PUBLISHED[k] for k in written} == written
    left_out = {"aux_loss_alpha", "seq_aux", "bos_token_id", "eos_token_id", "pretraining_tp", "quantization_config"}
    assert set(PUBLISHED) - set(written) == left_out | {"torch_dtype", "transformers_version", "use_cache"}


@pytest.mark.parametrize("preset", Config.PRESETS)
def test_config_json_round_trips(preset):
    cfg = Config.from_preset(preset)
    # a dense model's config.json says first_k_dense_replace = n_layer, the one rule transformers reads
    expected = cfg if cfg.n_experts else replace(cfg, first_k_dense_replace=cfg.n_layer)
    assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(cfg)))) == expected


def test_config_json_round_trips_every_yarn_field():
    yarn = dict(rope_original_block_size=2048, rope_beta_fast=2.0, rope_beta_slow=0.5, rope_mscale=0.8)
    cfg = Config.from_preset("kimi_k2", rope_factor=16.0, rope_mscale_all_dim=0.7, rope_truncate=False, **yarn)
    written = hf.config_to_hf(cfg)
    assert written["rope_scaling"]["truncate"] is False and written["rope_scaling"]["mscale"] == 0.8
    assert hf.config_from_hf(json.loads(json.dumps(written))) == cfg


def test_save_pretrained_writes_model_type_kimi_k2_and_the_4x_rope_spelling(tmp_path):
    model = Transformer(Config.from_preset("tiny_moe", n_layer=2, rope_factor=4.0, rope_original_block_size=64))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "kimi_k2" and saved["auto_map"] == PUBLISHED["auto_map"]
    assert saved["architectures"] == ["DeepseekV3ForCausalLM"] and saved["num_nextn_predict_layers"] == 0
    assert "rope_parameters" not in saved and saved["rope_theta"] == 50000.0
    assert saved["rope_scaling"]["type"] == "yarn" and "rope_type" not in saved["rope_scaling"]
    reloaded = Transformer.from_pretrained(tmp_path)
    assert reloaded.cfg == model.cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())


# -----------------------------------------------------------------------------
# An FP8 checkpoint in K2's layout: the published config.json's fields at a small shape (sizes above
# one 128 x 128 block and not multiples of it), per-expert weights, 61 -> 2 layers


SMALL = dict(
    vocab_size=97,
    max_position_embeddings=256,
    hidden_size=144,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=136,
    kv_lora_rank=130,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    intermediate_size=264,
    moe_intermediate_size=40,
    n_routed_experts=6,
    num_experts_per_tok=2,
)


def small_published_config():
    rope = {**PUBLISHED["rope_scaling"], "original_max_position_embeddings": 8}  # 256 = 32 x 8, as 131,072 = 32 x 4,096
    return {**PUBLISHED, **SMALL, "rope_scaling": rope}


def test_an_fp8_checkpoint_in_k2s_layout_loads_dequantized(tmp_path):
    config = small_published_config()
    torch.manual_seed(0)
    source = randomize_(Transformer(hf.config_from_hf(config)))
    fp8 = {}
    for name, t in hf.ours_to_hf(source.state_dict(), source.cfg).items():
        fp8.update(
            dict(zip((name, name + "_scale_inv"), quantize_blocks(t.float()))) if QUANTIZED.search(name) else {name: t}
        )
    assert "model.layers.1.mlp.experts.5.down_proj.weight_scale_inv" in fp8  # per expert, as published
    hf.write_safetensors_dir(tmp_path, fp8, max_shard_bytes=60_000)
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = {
        name: dequantize_blocks(t, fp8[name + "_scale_inv"]) if name + "_scale_inv" in fp8 else t
        for name, t in fp8.items()
        if not name.endswith("_scale_inv")
    }
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.cfg == source.cfg and loaded.cfg.n_mtp == 0
    state = loaded.state_dict()
    for name, t in hf.hf_to_ours(expected, loaded.cfg).items():
        assert torch.equal(state[name], t), name
    wkv_a = state["layers.0.attn.wkv_a.weight"]
    assert not torch.equal(wkv_a, source.state_dict()["layers.0.attn.wkv_a.weight"])  # lossy: really FP8


# -----------------------------------------------------------------------------
# K2's YaRN against transformers: beta_fast = beta_slow = 1 makes the ramp a step (lo == hi guard)


def k2_oracle_config(transformers):
    fields = {
        k: v
        for k, v in small_published_config().items()
        if k not in ("model_type", "quantization_config", "torch_dtype")
    }
    return transformers.DeepseekV3Config(**{**fields, "n_shared_experts": 1, "bos_token_id": 0, "eos_token_id": 0})


def test_k2_yarn_matches_deepseek_v3_for_causal_lm_both_ways(tmp_path):
    transformers = import_transformers()
    torch.manual_seed(0)
    theirs = randomize_(transformers.DeepseekV3ForCausalLM(k2_oracle_config(transformers)).eval())
    theirs.save_pretrained(tmp_path / "theirs")
    ours = Transformer.from_pretrained(tmp_path / "theirs").eval()
    assert (ours.cfg.rope_factor, ours.cfg.rope_beta_fast, ours.cfg.rope_beta_slow) == (32.0, 1.0, 1.0)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() <= 1e-4
    randomize_(ours, seed=3)
    ours.save_pretrained(tmp_path / "ours")  # K2's spelling, read into transformers' DeepseekV3Config
    back = hf_from_pretrained("DeepseekV3ForCausalLM", tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-4


# -----------------------------------------------------------------------------
# The diff against deepseek3: Config (defaults, presets) in model.py, the config.json spelling in hf.py,
# and any other deviation marked on its line `# diff vs deepseek3: <why>` (QK-Clip's statistic)


def definitions(module):
    """{name: source} of a module's functions and classes, and of each class's methods as Class.method."""
    found = {}
    for name, obj in vars(module).items():
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__:
            found[name] = inspect.getsource(obj)
            methods = [(m, getattr(f, "__func__", f)) for m, f in vars(obj).items()] if inspect.isclass(obj) else ()
            # written in the file, not generated (a dataclass's __init__, __eq__ have no source)
            written = [
                (m, f) for m, f in methods if inspect.isfunction(f) and f.__code__.co_filename == module.__file__
            ]
            found.update({f"{name}.{m}": inspect.getsource(f) for m, f in written})
    return found


@pytest.mark.parametrize(
    "module,differs",
    [("model", {"Config", "Config.tiny_moe"}), ("hf", {"config_to_hf", "yarn_to_hf"})],
)
def test_only_the_config_differs_from_deepseek3_unless_marked(module, differs):
    ours = definitions(importlib.import_module(f"kimi_k2.{module}"))
    theirs = definitions(importlib.import_module(f"deepseek3.{module}"))
    presets = {"Config.kimi_k2", "Config.deepseek_v3", "Config.deepseek_v3_16b"}
    assert set(ours) - presets == set(theirs) - presets
    changed = {name for name in set(ours) - presets if ours[name] != theirs[name]}
    unmarked = {name for name in changed - differs if "# diff vs deepseek3:" not in ours[name]}
    assert not unmarked, f"kimi_k2/{module}.py: {sorted(unmarked)} differ from deepseek3's without a mark"
    assert differs <= changed


def test_hf_tables_are_deepseek3s():
    tables = {name: value for name, value in vars(hf).items() if name.isupper()}
    assert tables.pop("KIMI_K2_AUTO_MAP") == PUBLISHED["auto_map"]
    deepseek3_hf = importlib.import_module("deepseek3.hf")
    assert tables == {name: value for name, value in vars(deepseek3_hf).items() if name.isupper()}
