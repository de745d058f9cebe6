"""Kimi K2 checkpoints in the Hugging Face format, as Moonshot publishes them (moonshotai/Kimi-K2-Instruct,
-Base): a directory with config.json and the weights of DeepSeek-V3's `DeepseekV3ForCausalLM`, one matrix
per expert, in model.safetensors or in numbered shards listed by model.safetensors.index.json. K2's
config.json is DeepSeek-V3's with `"model_type": "kimi_k2"`, an `auto_map` naming Moonshot's remote code
(a copy of DeepSeek's), the 4.x spelling (`rope_theta` beside `rope_scaling` with `"type": "yarn"`, no
`rope_parameters`), `num_nextn_predict_layers: 0` and an FP8 `quantization_config`. transformers has no
kimi_k2 class and `AutoConfig` needs Moonshot's remote code; its `DeepseekV3ForCausalLM` loads these
directories given the config.json read as a `DeepseekV3Config` (transformers 5 picks its per-expert weight
conversion by model_type: under "kimi_k2" it leaves the experts at random, tests/registry.py's
hf_from_pretrained). Reads K2's config and transformers' own deepseek_v3 one in
both spellings (>= 5's `rope_parameters` too); writes K2's layout and spelling back. FP8 checkpoints
(float8_e4m3fn weights in 128 x 128 blocks with `weight_scale_inv`, as DeepSeek-V3's) are dequantised on
load; `save` writes unquantised weights and so no quantization_config, and writes the `auto_map` as
published but not the remote-code files it names (copy them in from the hub to load it through
`trust_remote_code`). An MTP layer, which K2 does not publish, would be model.layers.{num_hidden_layers}.

This file is deepseek3/hf.py with K2's config.json spelling (config_to_hf, yarn_to_hf). Nothing here is
architecture: model.py never meets a Hugging Face name. Sections, in the same order in every model's
hf.py: config.json <-> Config; weight names <-> ours; safetensors directories; strict loading; `load`
and `save`, behind `Transformer.from_pretrained` and `Transformer.save_pretrained`.
"""

import functools
import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .model import Config, Transformer

# -----------------------------------------------------------------------------
# config.json <-> Config: DeepseekV3Config


def config_from_hf(hf: dict, **overrides) -> Config:
    refuse_unimplemented(hf)
    check_quantization(hf.get("quantization_config"))
    # transformers >= 5 writes rope_parameters (rope_theta inside); older configs, including
    # DeepSeek's published one, write rope_theta beside a rope_scaling dict
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(
            f"config.json asks for RoPE scaling of type {rope_type!r} (rope_parameters / rope_scaling); "
            "DeepSeek-V3 here supports only 'default' (unscaled RoPE) and 'yarn'"
        )
    scaling = dict(rope_factor=None)
    if rope_type == "yarn":
        scaling = yarn_from_hf(rope, hf)
    n_experts = hf.get("n_routed_experts", hf.get("num_local_experts")) or 0
    return Config(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        **scaling,
        n_experts=n_experts,
        n_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
        scoring_func=hf.get("scoring_func", "sigmoid"),
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        norm_topk_prob=hf.get("norm_topk_prob", True),
        routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
        n_mtp=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0,
        init_std=hf.get("initializer_range", 0.02),
        **overrides,
    )


def refuse_unimplemented(hf: dict):
    """One line naming what config.json asks for that this model does not implement."""
    asks = {
        "attention_bias": hf.get("attention_bias", False),
        "rope_interleave false": hf.get("rope_interleave", True) is False,
        f"hidden_act {hf.get('hidden_act')!r}": hf.get("hidden_act", "silu") != "silu",
        f"topk_method {hf.get('topk_method')!r}": hf.get("topk_method", "noaux_tc") != "noaux_tc",
        f"scoring_func {hf.get('scoring_func')!r}": hf.get("scoring_func", "sigmoid") not in ("sigmoid", "softmax"),
        f"num_nextn_predict_layers {hf.get('num_nextn_predict_layers')}": (hf.get("num_nextn_predict_layers") or 0) > 1,
    }
    unimplemented = [what for what, asked in asks.items() if asked]
    if unimplemented:
        raise ValueError(
            f"config.json asks for {', '.join(unimplemented)}; DeepSeek-V3 as released does not, and this "
            "file does not implement it (attention without bias, interleaved RoPE, silu, noaux_tc top-k, "
            "sigmoid or softmax scores, at most one MTP layer)"
        )


def config_to_hf(cfg: Config) -> dict:
    # diff vs deepseek3: K2's published layout: model_type kimi_k2, the remote code's auto_map, the 4.x
    # rope_theta + rope_scaling spelling (which transformers >= 5 also reads), no rope_interleave key
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "auto_map": KIMI_K2_AUTO_MAP,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": yarn_to_hf(cfg) if cfg.rope_factor is not None and cfg.rope_type == "yarn" else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.n_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "moe_layer_freq": 1,  # the remote code's: every layer from first_k_dense_replace on is MoE
        "n_shared_experts": cfg.n_shared_experts,
        # transformers builds MoE layers from first_k_dense_replace alone: a dense model's is n_layer
        "first_k_dense_replace": cfg.first_k_dense_replace if cfg.n_experts else cfg.n_layer,
        "topk_method": "noaux_tc",
        "scoring_func": cfg.scoring_func,  # transformers' DeepseekV3 always uses sigmoid
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "num_nextn_predict_layers": cfg.n_mtp,
    }


# the remote code moonshotai/Kimi-K2-Instruct names in its config.json (DeepSeek-V3's modeling files)
KIMI_K2_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}


def yarn_from_hf(rope: dict, hf: dict) -> dict:
    """Config fields of a YaRN rope_parameters / rope_scaling dict, with transformers' defaults."""
    if rope.get("attention_factor") is not None:
        raise ValueError(
            "config.json sets YaRN's attention_factor, which DeepSeek-V3 does not use and this model does "
            "not implement; give mscale and mscale_all_dim instead"
        )
    # a top-level original_max_position_embeddings (Phi-3's spelling) wins, as in transformers
    original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    original = original or hf["max_position_embeddings"]
    factor = rope.get("factor")
    return dict(
        rope_type="yarn",
        rope_factor=float(hf["max_position_embeddings"] / original if factor is None else factor),
        rope_original_block_size=original,
        rope_beta_fast=float(rope.get("beta_fast") or 32.0),  # transformers: `or`, so 0 means the default too
        rope_beta_slow=float(rope.get("beta_slow") or 1.0),
        rope_mscale=float(rope.get("mscale") or 0.0),  # absent: unset, as transformers reads it
        rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        rope_truncate=rope.get("truncate", True),
    )


def yarn_to_hf(cfg: Config) -> dict:
    yarn = dict(
        type="yarn",  # diff vs deepseek3: the 4.x key, as K2's config.json spells it
        factor=cfg.rope_factor,
        original_max_position_embeddings=cfg.rope_original_block_size,
        beta_fast=cfg.rope_beta_fast,
        beta_slow=cfg.rope_beta_slow,
        mscale=cfg.rope_mscale,
        mscale_all_dim=cfg.rope_mscale_all_dim,
    )
    if not cfg.rope_truncate:  # written only when off: transformers 4.x warns about a key it does not know
        yarn["truncate"] = False
    return yarn


def read_config(path, **overrides) -> Config:
    hf = json.loads((Path(path) / "config.json").read_text())
    # diff vs qwen3: the weights' headers too, for FP8 tensors without scales and an MTP layer not saved
    dtypes = weight_dtypes(path)
    refuse_fp8_without_scale([name for name, dtype in dtypes.items() if is_fp8(dtype)], dtypes)
    try:
        return config_from_hf(mtp_as_saved(hf, dtypes, overrides.pop("n_mtp", None)), **overrides)
    except KeyError as e:  # a field that is not there: one line naming the file, not a bare KeyError
        raise CheckpointError(
            f"{Path(path) / 'config.json'}: no {e.args[0]!r} field, which this loader needs"
        ) from None


def mtp_as_saved(hf: dict, weight_names, asked=None) -> dict:
    """config.json's dict with num_nextn_predict_layers set to `asked` (the caller's n_mtp) if given,
    else to 0 if it counts MTP layers that the weights lack. transformers' DeepseekV3ForCausalLM has
    no MTP module: its save_pretrained writes no model.layers.{num_hidden_layers}.* while its config
    keeps num_nextn_predict_layers: 1. Such a checkpoint loads as the model it holds, without MTP, as
    transformers loads it: inference never runs the module, and a random one passed off as loaded
    would, in training, send an untrained head's gradients into the pretrained trunk. Who wants that
    passes n_mtp=1 and gets a freshly initialised module (load); train.py's --init-from, which takes
    no overrides, trains such a checkpoint without MTP."""
    counted = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))
    if asked is None and counted and weight_names:  # no weight files: the loader says so
        layer = re.compile(rf"(model\.)?layers\.{hf['num_hidden_layers']}\.")
        asked = None if any(layer.match(name) for name in weight_names) else 0
    return hf if asked is None else {**hf, "num_nextn_predict_layers": asked}


def weight_dtypes(path) -> dict:
    """{tensor name: safetensors dtype ("F8_E4M3", "BF16", ...)} from the headers of the directory's
    weight files, none of the data; {} when it has none."""
    try:
        files = {f for layer in safetensors_layer_names(path) for f, _ in layer}
    except FileNotFoundError:
        return {}
    dtypes = {}
    for f in sorted(files):
        with safe_open(Path(path) / f, "pt") as st:
            dtypes.update({name: st.get_slice(name).get_dtype() for name in st.keys()})  # noqa: SIM118
    return dtypes


# -----------------------------------------------------------------------------
# Weight names <-> ours

# Hugging Face DeepSeek-V3 names -> ours (each with a ".weight"). DeepSeek's q and k rope dims are
# interleaved pairs, the layout of our apply_rope, so every tensor copies across unchanged. A layer
# holds either the dense mlp.w1/w2/w3 or the MoE's router, experts (HF_EXPERT_NAMES) and shared experts.
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wq_a": "self_attn.q_a_proj",
    "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.wq_b": "self_attn.q_b_proj",
    "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm",
    "attn.wkv_b": "self_attn.kv_b_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.router": "mlp.gate",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
    "mlp.shared_experts.w1": "mlp.shared_experts.gate_proj",
    "mlp.shared_experts.w2": "mlp.shared_experts.down_proj",
    "mlp.shared_experts.w3": "mlp.shared_experts.up_proj",
}
# names without the ".weight": the router's selection bias, a buffer in transformers
HF_LAYER_TENSORS = {"mlp.router.bias": "mlp.gate.e_score_correction_bias"}
HF_TOP_NAMES = {"tok_emb": "embed_tokens", "norm": "norm"}
# our stacked (n_experts, out, in) expert matrix <- HF's mlp.experts.{e}.<name>.weight, one per expert
HF_EXPERT_NAMES = {"mlp.w1": "gate_proj", "mlp.w2": "down_proj", "mlp.w3": "up_proj"}
# the MTP module (ours mtp.0.<name>) <- HF's layer num_hidden_layers: its own norms and projection beside
# a decoder layer's names (mtp.0.block.<ours>); embed_tokens and shared_head.head there are copies of the
# main model's embedding and head, which the module shares: written on save, dropped on load
HF_MTP_NAMES = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}
HF_MTP_COPIES = {"tok_emb": "embed_tokens", "lm_head": "shared_head.head"}


def hf_to_ours(hf_state, cfg):
    # diff vs qwen3: DeepSeek's FP8 weights to float32, for load; read_layers_as_ours dequantises each
    # weight as it reads it (read_rows) and hands this function no scales
    hf_state = dequantize_state(hf_state)
    # checkpoints saved from DeepseekV3Model have no "model." prefix; drop RoPE tables (ours come from cfg)
    hf = {k.removeprefix("model."): v for k, v in hf_state.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    out = {}
    for ours, theirs in HF_TOP_NAMES.items():
        if f"{theirs}.weight" in hf:
            out[f"{ours}.weight"] = hf.pop(f"{theirs}.weight")
    for i in range(cfg.n_layer):
        out.update(layer_to_ours(hf, f"layers.{i}.", f"layers.{i}.", cfg))
    for d in range(cfg.n_mtp):  # diff vs qwen3: the MTP layer(s) after the main ones
        a, b = f"mtp.{d}.", f"layers.{cfg.n_layer + d}."
        for ours, theirs in HF_MTP_NAMES.items():
            if f"{b}{theirs}.weight" in hf:
                out[f"{a}{ours}.weight"] = hf.pop(f"{b}{theirs}.weight")
        for theirs in HF_MTP_COPIES.values():
            hf.pop(f"{b}{theirs}.weight", None)
        out.update(layer_to_ours(hf, b, a + "block.", cfg))
    if "lm_head.weight" in hf:
        lm_head = hf.pop("lm_head.weight")
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = lm_head
    if cfg.tie_embeddings and "tok_emb.weight" in out:
        out["lm_head.weight"] = out["tok_emb.weight"]
    out.update(hf)  # leftovers keep their HF names and surface as unexpected keys
    return out


def layer_to_ours(hf, b, a, cfg):
    """Pop HF's decoder layer at prefix b out of hf; return it in our names at prefix a."""
    out = {}
    for ours, theirs in HF_LAYER_NAMES.items():
        if f"{b}{theirs}.weight" in hf:
            out[f"{a}{ours}.weight"] = hf.pop(f"{b}{theirs}.weight")
    for ours, theirs in HF_LAYER_TENSORS.items():
        if b + theirs in hf:
            out[a + ours] = hf.pop(b + theirs)
    # stack the experts. Published checkpoints (and transformers' save_pretrained) hold one matrix
    # per expert; transformers >= 5 keeps them fused in memory, gate and up concatenated as
    # gate_up_proj (n_experts, 2 * hidden, n_embd), and down_proj
    e_ = f"{b}mlp.experts."
    for ours, theirs in HF_EXPERT_NAMES.items():
        keys = [f"{e_}{e}.{theirs}.weight" for e in range(cfg.n_experts)]
        if keys and all(k in hf for k in keys):
            out[a + ours] = torch.stack([hf.pop(k) for k in keys])  # (n_experts, out, in)
    if e_ + "gate_up_proj" in hf:
        out[a + "mlp.w1"], out[a + "mlp.w3"] = hf.pop(e_ + "gate_up_proj").chunk(2, dim=1)
    if e_ + "down_proj" in hf:
        out[a + "mlp.w2"] = hf.pop(e_ + "down_proj")
    return out


def ours_to_hf(state, cfg):
    hf = {}
    for ours, theirs in HF_TOP_NAMES.items():
        hf[f"model.{theirs}.weight"] = state[f"{ours}.weight"]
    for i in range(cfg.n_layer):
        hf.update(layer_to_hf(state, f"layers.{i}.", f"model.layers.{i}.", cfg))
    for d in range(cfg.n_mtp):  # diff vs qwen3: the MTP layer, with copies of the shared embedding and head
        a, b = f"mtp.{d}.", f"model.layers.{cfg.n_layer + d}."
        for ours, theirs in HF_MTP_NAMES.items():
            hf[f"{b}{theirs}.weight"] = state[f"{a}{ours}.weight"]
        for ours, theirs in HF_MTP_COPIES.items():  # cloned: safetensors refuses tensors that share memory
            hf[f"{b}{theirs}.weight"] = state[f"{ours}.weight"].clone()
        hf.update(layer_to_hf(state, a + "block.", b, cfg))
    if not cfg.tie_embeddings:  # tied: HF re-ties lm_head to embed_tokens on load
        hf["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in hf.items()}


def layer_to_hf(state, a, b, cfg):
    """Our layer at prefix a, in HF's names at prefix b; experts one matrix each, as published."""
    hf = {}
    for ours, theirs in HF_LAYER_NAMES.items():
        if a + ours + ".weight" in state:  # a layer is dense or MoE
            hf[b + theirs + ".weight"] = state[a + ours + ".weight"]
    for ours, theirs in HF_LAYER_TENSORS.items():
        if a + ours in state:
            hf[b + theirs] = state[a + ours]
    for ours, theirs in HF_EXPERT_NAMES.items():
        if a + ours in state:
            for e, w in enumerate(state[a + ours]):
                hf[f"{b}mlp.experts.{e}.{theirs}.weight"] = w
    return hf


# -----------------------------------------------------------------------------
# FP8 checkpoints: DeepSeek-V3 is published with its linear weights in float8_e4m3fn, 128 x 128
# blocks, each block with one float32 `<name>_scale_inv` (README_WEIGHTS.md of deepseek-ai/DeepSeek-V3).
# Norms, embeddings, lm_head and the router stay in bf16. We dequantise on load to float32 and keep
# no FP8 state: the model, its training and save_pretrained all see ordinary weights.

FP8_BLOCK = 128  # the published quantization_config's weight_block_size, in both dimensions
SCALE_SUFFIX = "_scale_inv"


def check_quantization(quant) -> None:
    """Accept no quantization_config, or DeepSeek-V3's published one; refuse any other in one line."""
    if quant is None:
        return
    # transformers' FP8 configs leave fmt out (e4m3 is its only format); the activation scheme does
    # not matter here, as the weights are dequantised and activations computed in the model's dtype
    found = (quant.get("quant_method"), quant.get("fmt", "e4m3"), list(quant.get("weight_block_size") or ()))
    if found != ("fp8", "e4m3", [FP8_BLOCK, FP8_BLOCK]):
        raise ValueError(
            f"config.json's quantization_config {quant} is not one this file reads: only DeepSeek-V3's "
            f'"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [{FP8_BLOCK}, {FP8_BLOCK}]'
        )


def dequantize_fp8(weight, scale_inv, name):
    """A (out, in) FP8 weight -> float32: each 128 x 128 block times its entry of scale_inv
    (ceil(out / 128), ceil(in / 128)). The last block of a row or column is partial: DeepSeek pads a
    block to 128 only to compute its scale and drops the padding, so its scale covers what is left."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: an FP8 weight of shape {tuple(weight.shape)}; block scales need a matrix")
    rows, cols = weight.shape
    blocks = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != blocks:
        raise ValueError(
            f"{name}{SCALE_SUFFIX}: shape {tuple(scale_inv.shape)}, but {name} {tuple(weight.shape)} "
            f"has {blocks} blocks of {FP8_BLOCK} x {FP8_BLOCK}"
        )
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return weight.float() * scale  # (out, in), as DeepSeek's weight_dequant: x.float() * s in float32


def dequantize_state(hf_state):
    """hf_state with every `<name>` that has a `<name>_scale_inv` dequantised and the scales dropped.
    (An FP8 tensor without its scale is refused earlier, by read_config, from the files' headers.)"""
    scaled = [n.removesuffix(SCALE_SUFFIX) for n in hf_state if n.endswith(SCALE_SUFFIX)]
    if not scaled:
        return hf_state
    out = {n: t for n, t in hf_state.items() if not n.endswith(SCALE_SUFFIX)}
    for name in scaled:
        if name not in out:
            raise KeyError(f"{name}{SCALE_SUFFIX}: a block scale without its weight {name}")
        out[name] = dequantize_fp8(out[name], hf_state[name + SCALE_SUFFIX], name)
    return out


def is_fp8(dtype: str) -> bool:
    """dtype: safetensors' name of one, as get_dtype() gives it ("F8_E4M3", "BF16", ...)."""
    return dtype.startswith("F8_")


def refuse_fp8_without_scale(fp8_names, names) -> None:
    for name in fp8_names:
        if name + SCALE_SUFFIX not in names:
            raise ValueError(f"{name}: stored in FP8 without its {name}{SCALE_SUFFIX}, so it cannot be dequantised")


# -----------------------------------------------------------------------------
# Safetensors directories: one model.safetensors, or shards + model.safetensors.index.json


def read_safetensors_dir(path):
    state = {}
    for part in read_safetensors_layers(path):
        state.update(part)
    return state


def safetensors_layer_names(path):
    """The directory's tensor names grouped by layer, those outside the layers first: [[(file, name)]]."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    layers = {}  # layer number (-1: outside the layers) -> [(file, name)]
    for f in files:
        with safe_open(path / f, "pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                number = re.search(r"\.(\d+)\.", name)  # the first number is the layer's: layers.3.mlp.experts.7.
                layers.setdefault(int(number[1]) if number else -1, []).append((f, name))
    return [names for _, names in sorted(layers.items())]


def read_safetensors_layers(path):
    """The directory's tensors one layer at a time, those outside the layers first: a loader that
    converts each part and keeps only its own shard of it never holds more."""
    path = Path(path)
    for names in safetensors_layer_names(path):
        part = {}
        for f in dict.fromkeys(f for f, _ in names):
            with safe_open(path / f, "pt") as st:  # mapped only while this layer is read
                part.update({name: st.get_tensor(name) for g, name in names if g == f})
        yield part


class TouchedTensors(TorchFunctionMode):
    """Records every tensor a torch function or Tensor method is called with: run over hf_to_ours, it
    tells the inputs a conversion uses from those it drops (GPT-2's masks, a tied lm_head). A
    torch.stack along dim 0 is recorded apart, as result -> inputs: row i of it is input i."""

    def __init__(self):
        super().__init__()
        self.ids, self.stacks, self.results = set(), {}, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.stack and not kwargs and len(args) == 1:
            self.stacks[id(result)] = [id(t) for t in args[0]]
            self.results.append(result)  # alive, so no later tensor reuses its id
        else:
            self.ids.update(id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        return result


def plan_conversion(shapes, cfg):
    """From {HF name: shape} alone (a dry run of hf_to_ours on meta tensors): {ours: HF name} for the
    tensors passed through (renamed, or kept: lm_head, leftovers), {ours: [HF names]} for those
    stacked from several (Qwen3's experts), and the HF names another transformation reads. An HF
    tensor in none (GPT-2's masks, a tied lm_head) is dropped and need not be read."""
    stand_ins = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    with TouchedTensors() as touched:
        converted = hf_to_ours(stand_ins, cfg)
    hf_name = {id(t): name for name, t in stand_ins.items()}
    renamed = {ours: hf_name[id(t)] for ours, t in converted.items() if id(t) in hf_name}
    stacked = {
        ours: [hf_name[i] for i in touched.stacks[id(t)]]
        for ours, t in converted.items()
        if all(i in hf_name for i in touched.stacks.get(id(t), [None]))
    }
    transformed = [name for name, t in stand_ins.items() if id(t) in touched.ids]
    return renamed, stacked, transformed


def read_layers_as_ours(path, cfg, rows_of=lambda name, shape: None):
    """The checkpoint in our names, one layer at a time: yields {ours: (full shape, tensor)}, where
    tensor holds only rows start:stop of dim 0 when rows_of(ours, full shape) returns (start, stop)
    (an FSDP process's shard). A tensor that is only renamed is read as that slice from the file
    (safetensors' get_slice), so a process never reads the other rows; of one stacked from several
    (Qwen3's per-expert matrices) only the parts that make its rows are read. One that another
    conversion transforms (GPT-2's fused, transposed c_attn) is read whole with the rest of its
    layer, converted, then cut, since its rows come from several places of the file."""
    for names in safetensors_layer_names(path):
        yield read_layer_as_ours(Path(path), names, cfg, rows_of)


def read_layer_as_ours(path, names, cfg, rows_of):
    """One layer of read_layers_as_ours, from [(file, HF name)]; a function of its own so that what
    it reads is freed on return, not kept by the generator's locals while the next layer is read."""
    with ExitStack() as files:
        opened = {f: files.enter_context(safe_open(path / f, "pt")) for f in dict.fromkeys(f for f, _ in names)}
        # diff vs qwen3: an FP8 weight and its scale are read together and dequantised at once (read_rows),
        # so the plan, made without the scales, sees it renamed or stacked, not transformed: a process
        # reads only its experts and its block rows. A scale without its weight stays in the plan and is
        # refused by name (dequantize_state)
        file_of = {name: opened[f] for f, name in names}
        scales = {n for n in file_of if n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) in file_of}
        slices = {name: opened[f].get_slice(name) for f, name in names if name not in scales}
        whole = {name: functools.partial(read_rows, file_of, name, None) for name in slices}
        renamed, stacked, transformed = plan_conversion({n: s.get_shape() for n, s in slices.items()}, cfg)
        part = {}
        read = {}  # (HF name, rows) -> tensor: a tied head is the embedding's rows, read once
        for ours, theirs in renamed.items():
            shape = torch.Size(slices[theirs].get_shape())
            rows = rows_of(ours, shape)
            if (theirs, rows) not in read:
                read[theirs, rows] = read_rows(file_of, theirs, rows)
            part[ours] = (shape, read[theirs, rows])
        for ours, parts in stacked.items():
            shape = torch.Size([len(parts), *slices[parts[0]].get_shape()])
            start, stop = rows_of(ours, shape) or (0, len(parts))
            empty = read_rows(file_of, parts[0], (0, 0)).new_empty((0, *shape[1:]))  # a process left without rows
            part[ours] = (shape, torch.stack([whole[n]() for n in parts[start:stop]]) if stop > start else empty)
        for ours, tensor in hf_to_ours({n: whole[n]() for n in transformed}, cfg).items():
            if ours not in part:
                rows = rows_of(ours, tensor.shape)
                part[ours] = (tensor.shape, tensor[rows[0] : rows[1]].clone() if rows else tensor)
    return part


def read_rows(file_of, name, rows):
    """Rows start:stop of tensor `name` (all if rows is None) from {HF name: open safetensors file}. An FP8
    weight with a `<name>_scale_inv` comes dequantised: its whole 128-row blocks that hold the rows are read
    with their rows of the scale (one per block), dequantised, then cut."""
    scale_name = name + SCALE_SUFFIX
    if scale_name not in file_of:
        return file_of[name].get_slice(name)[rows[0] : rows[1]] if rows else file_of[name].get_tensor(name)
    weight = file_of[name].get_slice(name)
    start, stop = rows or (0, weight.get_shape()[0])
    first, last = start // FP8_BLOCK, -(-stop // FP8_BLOCK)  # the blocks that hold rows start:stop
    blocks = weight[first * FP8_BLOCK : last * FP8_BLOCK]  # (rows of those blocks, in)
    scale = file_of[scale_name].get_slice(scale_name)[first:last]
    dequantized = dequantize_fp8(blocks, scale, name)
    offset = first * FP8_BLOCK
    return dequantized[start - offset : stop - offset].clone() if rows else dequantized


def is_meta_dir(path) -> bool:
    """Whether path holds Meta's own layout (params.json + consolidated.NN.pth), which only Llama is
    published in: never for this model, so train.py's --init-from asks for config.json."""
    return False


def write_safetensors_dir(path, state, max_shard_bytes=5 * 2**30):
    """Write state (name -> contiguous tensor) as model.safetensors if it fits in max_shard_bytes,
    else as model-00001-of-0000N.safetensors ... plus the index mapping each name to its file, the
    layout transformers writes. Tensors keep their order; one larger than the limit gets a shard
    of its own. Weight files of an earlier save in the same directory are removed first."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stale = [path / "model.safetensors", path / "model.safetensors.index.json", *path.glob("model-*-of-*.safetensors")]
    for old in stale:  # else a shard of an earlier, larger save would be read back with the new ones
        old.unlink(missing_ok=True)
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# -----------------------------------------------------------------------------
# Strict loading


def mismatches(expected, found):
    """What keeps a checkpoint from loading, from {name: shape} of the model and of the checkpoint:
    "missing keys [...]; unexpected keys [...]; shape mismatches [...]" (the clauses that apply), or ""."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(v)}" for k, v in expected.items() if found.get(k, v) != v
    ]
    clauses = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
    return "; ".join(f"{what}: {names}" for what, names in clauses if names)


def load_state_dict_strict(model, state):
    """load_state_dict that names every missing, unexpected or mis-shaped key."""
    problems = mismatches({k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()})
    if problems:
        raise KeyError(f"checkpoint does not match the model: {problems}")
    model.load_state_dict(state)


# -----------------------------------------------------------------------------
# Entry points: Transformer.from_pretrained and Transformer.save_pretrained call these


class CheckpointError(ValueError):
    """A path that holds no checkpoint this loader reads; the message is one line and names the path."""


def hub_download_hint(name) -> str:
    """Where name reads as a Hugging Face hub id ("org/name", or a bare name as the hub's oldest ones are),
    a clause saying how to download it first, since the loaders read local directories only; else ""."""
    if not re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", str(name)):
        return ""
    local = f"checkpoints/{str(name).rpartition('/')[2]}"
    return (
        f"a Hugging Face hub name must be downloaded first, e.g. `hf download {name} --local-dir {local}` "
        f"(or `huggingface-cli download ...`), then pass {local}"
    )


def check_checkpoint_dir(path, expected="config.json and *.safetensors, as save_pretrained writes them"):
    """Refuse in one line what this loader cannot read: a path that does not exist (a hub name not yet
    downloaded among them), a file, a directory without config.json, or another architecture's
    checkpoint, named by its model_type with the loader that reads it. Unknown model_types pass."""
    # config.json's model_type -> the packages whose from_pretrained reads it (K2 is DeepSeek-V3's architecture)
    readers = {
        "gpt2": ["gpt2"],
        "llama": ["llama31"],
        "qwen3": ["qwen3"],
        "qwen3_moe": ["qwen3"],
        "deepseek_v3": ["deepseek3", "kimi_k2"],
        "kimi_k2": ["kimi_k2", "deepseek3"],
    }
    ours = __package__.rpartition(".")[2]  # "gpt2", also when installed as minllm.gpt2
    hint = hub_download_hint(path)
    if not Path(path).exists():
        raise CheckpointError(f"{path}: not a local directory; {hint}" if hint else f"{path}: no such directory")
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: a file, not a checkpoint directory (one holds {expected})")
    file = Path(path) / "config.json"
    if not file.is_file():
        # a hub name can also be a local folder (run from this repository, "gpt2" is the package)
        also = f"; {hint}" if hint else ""
        raise CheckpointError(f"{path}: no config.json there (a checkpoint directory holds {expected}){also}")
    try:
        theirs = json.loads(file.read_text()).get("model_type")
    except (ValueError, AttributeError) as e:  # not JSON, or JSON but not an object
        raise CheckpointError(f"{file}: not a JSON object ({e})") from None
    if theirs in readers and ours not in readers[theirs]:
        raise CheckpointError(
            f"{path} holds a {theirs!r} checkpoint; this is {ours}'s loader: "
            f"use {readers[theirs][0]}.model.Transformer.from_pretrained"
        )


def load(path, **overrides) -> Transformer:
    """A Hugging Face directory -> our model; overrides replace Config fields (e.g. attn_impl)."""
    check_checkpoint_dir(path)
    cfg = read_config(path, **overrides)  # n_mtp 0 where the MTP layer was not saved (mtp_missing) ...
    model = Transformer(cfg)
    state = hf_to_ours(read_safetensors_dir(path), cfg)
    if cfg.n_mtp and not any(k.startswith("mtp.") for k in state):
        # diff vs qwen3: ... unless the caller asked for it (n_mtp=1): the module keeps its initial values
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("mtp.")})
    if "n_mtp" in overrides:  # diff vs qwen3: MTP layers the caller chose not to load (n_mtp=0 on the published
        # checkpoint, for inference) are left unread rather than refused as unexpected keys
        extra = re.compile(r"layers\.(\d+)\.")
        state = {k: v for k, v in state.items() if not (m := extra.match(k)) or int(m.group(1)) < cfg.n_layer}
    load_state_dict_strict(model, state)
    return model


def save(model, path, max_shard_bytes=5 * 2**30):
    """Our model -> a Hugging Face directory that transformers' from_pretrained loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    write_safetensors_dir(path, ours_to_hf(model.state_dict(), model.cfg), max_shard_bytes)
