"""DeepSeek-V3 checkpoints as published (issue #10). The FP8 weights, float8_e4m3fn in 128 x 128
blocks each with a float32 `weight_scale_inv`, are dequantised on load by from_pretrained and by
train.py's --init-from, bit for bit, also when a process reads only some rows; the MTP layer at
model.layers.{n_layer}.* is written and read back; a checkpoint of transformers' own
DeepseekV3ForCausalLM, which has no MTP layer while its config says num_nextn_predict_layers 1,
loads without MTP (or, asked for, with a fresh module); and bad FP8 input is refused by name."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from deepseek3 import hf
from deepseek3 import infra as ds3_infra
from deepseek3.model import Config, Transformer
from registry import import_transformers, randomize_
from test_sliced_load import CountingSafeOpen

CPU = torch.device("cpu")
BLOCK = 128
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# Sizes above one block and not multiples of it, so most weights end in partial edge blocks
# (wkv_a is (138, 144): 2 x 2 blocks, the last ones 10 rows and 16 columns). Layer 0 is dense,
# layer 1 and the MTP block are MoE.
SMALL = dict(
    vocab_size=97,
    block_size=64,
    n_layer=2,
    n_head=2,
    n_embd=144,
    q_lora_rank=136,
    kv_lora_rank=130,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    intermediate_size=264,
    n_experts=4,
    n_experts_per_tok=2,
    moe_intermediate_size=40,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    n_mtp=1,
)
# The linear weights of attention and of the MLPs (dense, routed and shared experts, the MTP
# block's) are FP8 in DeepSeek's files; norms, embeddings, lm_head, the router and eh_proj are not.
QUANTIZED = re.compile(
    r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(\S+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(Config(**{**SMALL, **overrides}))
    return randomize_(model, seed).eval()  # std-0.1 weights, nonzero router biases: a misplaced tensor shows


# -----------------------------------------------------------------------------
# A checkpoint as DeepSeek publishes it, quantised here with padding and reshapes, independently of
# hf.py's dequantisation


def quantize_blocks(w):
    """(out, in) float32 -> (FP8 weight, float32 scale_inv (ceil(out/128), ceil(in/128))): each
    block zero-padded to 128 x 128 for its absolute maximum, scaled onto e4m3's range, unpadded."""
    rows, cols = w.shape
    R, C = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(R * BLOCK, C * BLOCK)
    padded[:rows, :cols] = w
    blocks = padded.view(R, BLOCK, C, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)) / E4M3_MAX  # (R, C)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(R * BLOCK, C * BLOCK)
    return q[:rows, :cols].contiguous(), scale


def dequantize_blocks(q, scale):
    rows, cols = q.shape
    R, C = scale.shape
    padded = torch.zeros(R * BLOCK, C * BLOCK)
    padded[:rows, :cols] = q.float()
    return (padded.view(R, BLOCK, C, BLOCK) * scale[:, None, :, None]).view(R * BLOCK, C * BLOCK)[:rows, :cols]


def publish_fp8(model, path, max_shard_bytes=60_000):
    """Write model as DeepSeek publishes it: FP8 linear weights + scales, sharded with an index.
    Returns the state it holds in our names, dequantised (what loading must give, bit for bit)."""
    fp8 = {}
    for name, t in hf.ours_to_hf(model.state_dict(), model.cfg).items():
        if QUANTIZED.search(name):
            fp8[name], fp8[name + "_scale_inv"] = quantize_blocks(t.float())
        else:
            fp8[name] = t.clone()  # the MTP layer's embed_tokens / shared_head.head share memory otherwise
    hf.write_safetensors_dir(path, fp8, max_shard_bytes)
    config = {**hf.config_to_hf(model.cfg), "quantization_config": QUANTIZATION}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    dequantized = {
        name: dequantize_blocks(t, fp8[name + "_scale_inv"]) if name + "_scale_inv" in fp8 else t
        for name, t in fp8.items()
        if not name.endswith("_scale_inv")
    }
    return hf.hf_to_ours(dequantized, model.cfg)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    model = small_model()
    return SimpleNamespace(path=path, model=model, expected=publish_fp8(model, path))


def assert_state_equal(state, expected):
    assert sorted(state) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(state[name], t), name


def build_args(init_from):
    return SimpleNamespace(activation_checkpointing=False, compile=False, init_from=str(init_from), parallel="none")


def init_from(path):
    """train.py's --init-from in one process: the config it reads and the model it builds."""
    cfg = ds3_infra.pretrained_config(str(path))
    model, _ = ds3_infra.build_model(build_args(path), cfg, CPU, None)
    return model.eval()


# -----------------------------------------------------------------------------
# FP8


def test_the_published_checkpoint_is_fp8_sharded_with_partial_blocks(published):
    index = json.loads((published.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    wkv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert f"{wkv_a}_scale_inv" in index["weight_map"]
    with hf.safe_open(published.path / index["weight_map"][wkv_a], "pt") as f:
        assert f.get_tensor(wkv_a).dtype == torch.float8_e4m3fn
        assert f.get_tensor(wkv_a).shape == (138, 144)
        assert f.get_tensor(f"{wkv_a}_scale_inv").shape == (2, 2)


def test_from_pretrained_dequantizes_bit_for_bit(published):
    loaded = Transformer.from_pretrained(published.path).eval()
    assert_state_equal(loaded.state_dict(), published.expected)
    reference = Transformer(published.model.cfg).eval()
    reference.load_state_dict(published.expected)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], reference(idx)[0])
    # the quantisation is lossy (e4m3 keeps 3 mantissa bits), so this is not the source model
    assert not torch.equal(
        loaded.state_dict()["layers.0.attn.wkv_a.weight"], published.model.state_dict()["layers.0.attn.wkv_a.weight"]
    )


def test_save_pretrained_writes_the_dequantized_weights_unquantized(published, tmp_path):
    Transformer.from_pretrained(published.path).save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    saved = hf.read_safetensors_dir(tmp_path)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert not [name for name in saved if name.endswith("_scale_inv")]
    assert_state_equal(Transformer.from_pretrained(tmp_path).state_dict(), published.expected)


def test_init_from_dequantizes_bit_for_bit(published):
    assert_state_equal(init_from(published.path).state_dict(), published.expected)


def test_a_process_reading_some_rows_gets_those_rows_of_the_dequantized_weights(published):
    """read_layers_as_ours as an FSDP process calls it: an FP8 weight is read in the whole 128-row blocks
    that hold its rows, with their scales, and cut after dequantising, as the rows of a block share one scale."""
    parts = {}
    for part in hf.read_layers_as_ours(published.path, published.model.cfg, lambda name, shape: (1, 3)):
        parts.update(part)
    assert sorted(parts) == sorted(published.expected)
    for name, (shape, rows) in parts.items():
        assert shape == published.expected[name].shape, name
        assert torch.equal(rows, published.expected[name][1:3]), name


def test_a_process_keeping_half_the_experts_reads_only_those_of_an_fp8_checkpoint(published, monkeypatch):
    """An FSDP process of two, its rows the first half of every tensor: of the FP8 experts, stacked from
    one matrix each, it reads (counted through safe_open) only its own with their scales, dequantised bit
    for bit; DeepSeek-V3 would otherwise read every expert of a layer in each process."""
    stored = hf.read_safetensors_dir(published.path)
    counts = {}
    monkeypatch.setattr(hf, "safe_open", CountingSafeOpen(hf.safe_open, counts))
    half = lambda name, shape: (0, shape[0] // 2)  # noqa: E731
    parts = {}
    for part in hf.read_layers_as_ours(published.path, published.model.cfg, half):
        parts.update(part)
    for name, (shape, rows) in parts.items():
        assert torch.equal(rows, published.expected[name][: shape[0] // 2]), name
    expert = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.\w+\.weight(_scale_inv)?$")
    read = {name: n for name, n in counts.items() if expert.match(name)}
    half_experts = published.model.cfg.n_experts // 2
    kept = {name: t.numel() for name, t in stored.items() if (m := expert.match(name)) and int(m[1]) < half_experts}
    assert len(kept) == 2 * 3 * 2 * half_experts  # layer 1 and the MTP block, w1 w2 w3, weight and scale
    assert read == kept  # each of its experts read once, whole; not one element of the others


# -----------------------------------------------------------------------------
# Bad FP8 input


def test_an_fp8_weight_without_its_scale_is_refused_by_name(published, tmp_path):
    state = hf.read_safetensors_dir(published.path)
    wkv_b = "model.layers.1.self_attn.kv_b_proj.weight"
    del state[f"{wkv_b}_scale_inv"]
    hf.write_safetensors_dir(tmp_path, state, max_shard_bytes=60_000)
    (tmp_path / "config.json").write_text((published.path / "config.json").read_text())
    message = f"{re.escape(wkv_b)}: stored in FP8 without its {re.escape(wkv_b)}_scale_inv"
    with pytest.raises(ValueError, match=message):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(SystemExit, match=message):  # before --init-from reads a slice of it as if float
        init_from(tmp_path)


def test_a_scale_of_the_wrong_shape_is_refused_by_name(published, tmp_path):
    state = hf.read_safetensors_dir(published.path)
    wo = "model.layers.0.self_attn.o_proj.weight"
    state[f"{wo}_scale_inv"] = state[f"{wo}_scale_inv"][:1].contiguous()
    hf.write_safetensors_dir(tmp_path, state)
    (tmp_path / "config.json").write_text((published.path / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"{re.escape(wo)}_scale_inv: shape \(1, 1\), but {re.escape(wo)}"):
        Transformer.from_pretrained(tmp_path)


def test_a_scale_without_its_weight_or_of_a_stacked_weight_is_refused_by_name():
    q, scale = quantize_blocks(torch.randn(130, 20))
    with pytest.raises(KeyError, match="w_scale_inv: a block scale without its weight w"):
        hf.dequantize_state({"w_scale_inv": scale})
    with pytest.raises(ValueError, match=r"w: an FP8 weight of shape \(2, 130, 20\)"):
        hf.dequantize_state({"w": torch.stack([q, q]), "w_scale_inv": scale})


@pytest.mark.parametrize(
    "change",
    [{"weight_block_size": [64, 64]}, {"fmt": "e5m2"}, {"quant_method": "bitsandbytes_4bit"}],
)
def test_a_quantization_config_other_than_deepseeks_is_refused_in_one_line(published, change):
    config = json.loads((published.path / "config.json").read_text())
    config["quantization_config"] = {**QUANTIZATION, **change}
    with pytest.raises(ValueError, match="quantization_config .* is not one this file reads"):
        hf.config_from_hf(config)


# -----------------------------------------------------------------------------
# MTP: model.layers.{n_layer}.* in the Hugging Face layout


def test_save_pretrained_writes_the_mtp_layer_and_from_pretrained_reads_it_back(tmp_path):
    model = small_model(seed=1)
    model.save_pretrained(tmp_path, max_shard_bytes=60_000)
    state = hf.read_safetensors_dir(tmp_path)
    mtp = f"model.layers.{SMALL['n_layer']}."
    names = ["enorm", "hnorm", "eh_proj", "shared_head.norm", "embed_tokens", "shared_head.head", "input_layernorm"]
    names += ["self_attn.kv_a_proj_with_mqa", "mlp.gate", "mlp.experts.3.down_proj", "mlp.shared_experts.up_proj"]
    assert all(f"{mtp}{name}.weight" in state for name in names)
    # DeepSeek's MTP layer carries copies of the shared embedding and output head
    assert torch.equal(state[f"{mtp}embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(state[f"{mtp}shared_head.head.weight"], state["lm_head.weight"])
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.cfg.n_mtp == 1
    assert_state_equal(loaded.state_dict(), model.state_dict())
    assert_state_equal(init_from(tmp_path).state_dict(), model.state_dict())


def transformers_save(model, path):
    """model saved by us, loaded by transformers' DeepseekV3ForCausalLM (which has no MTP module and
    drops its weights) and saved by it: its config keeps num_nextn_predict_layers 1."""
    transformers = import_transformers()
    model.save_pretrained(path / "ours")
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(path / "ours", dtype=torch.float32)
    theirs.save_pretrained(path / "theirs")
    return path / "theirs"


def test_a_transformers_checkpoint_without_the_mtp_layer_loads_without_mtp(tmp_path):
    model = small_model(seed=2)
    path = transformers_save(model, tmp_path)
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert not [k for k in hf.read_safetensors_dir(path) if k.startswith(f"model.layers.{SMALL['n_layer']}.")]
    main = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    loaded = Transformer.from_pretrained(path)
    assert loaded.cfg.n_mtp == 0
    assert_state_equal(loaded.state_dict(), main)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 12))
    with torch.no_grad():  # inference skips the MTP module, so nothing is lost
        assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])
    trained = init_from(path)
    assert trained.cfg.n_mtp == 0
    assert_state_equal(trained.state_dict(), main)


def test_a_transformers_checkpoint_loads_with_a_fresh_mtp_module_when_asked(tmp_path):
    model = small_model(seed=3)
    path = transformers_save(model, tmp_path)
    torch.manual_seed(5)
    loaded = Transformer.from_pretrained(path, n_mtp=1)
    torch.manual_seed(5)
    fresh = Transformer(Config(**SMALL))  # what the module holds: the model's own initial values
    main = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    mtp = {k: v for k, v in fresh.state_dict().items() if k.startswith("mtp.")}
    assert mtp
    assert_state_equal(loaded.state_dict(), {**main, **mtp})


def test_n_mtp_0_loads_a_checkpoint_with_an_mtp_layer_without_it(tmp_path):
    """The published checkpoint holds its MTP layer; inference asks for n_mtp=0 and skips it."""
    model = small_model(seed=4)
    model.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path, n_mtp=0)
    assert loaded.cfg.n_mtp == 0
    assert_state_equal(loaded.state_dict(), {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    with pytest.raises(KeyError, match="unexpected"):  # a layer beyond the config's, asked for nothing, still refused
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
        Transformer.from_pretrained(tmp_path)
