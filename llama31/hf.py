"""Llama 3.1 and 3.2 checkpoints in the Hugging Face format: a directory with config.json (the
fields of transformers' `LlamaConfig`) and the weights of `LlamaForCausalLM` in model.safetensors,
or in numbered shards listed by model.safetensors.index.json. Reads both spellings of the RoPE
settings, transformers >= 5's `rope_parameters` and the 4.x `rope_theta` + `rope_scaling` of the
hub's meta-llama/* configs; writes the >= 5 spelling, which transformers 4.x also loads.

Nothing here is architecture: model.py never meets a Hugging Face name. Sections, in the same
order in every model's hf.py: config.json <-> Config; weight names <-> ours; safetensors
directories; strict loading; `load` and `save`, behind `Transformer.from_pretrained` and
`Transformer.save_pretrained`.
"""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .model import Config, Transformer

# -----------------------------------------------------------------------------
# config.json <-> Config


def config_from_hf(hf: dict, **overrides) -> Config:
    # transformers >= 5 writes rope_parameters (rope_theta inside); older configs, including
    # Meta's published ones, write rope_theta beside a rope_scaling dict
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json rope_type {rope_type!r} is not supported; Llama 3 uses 'llama3' or 'default'")
    scaling = dict(rope_factor=None)
    if rope_type == "llama3":
        scaling = dict(
            rope_factor=rope["factor"],
            rope_low_freq_factor=rope["low_freq_factor"],
            rope_high_freq_factor=rope["high_freq_factor"],
            rope_original_block_size=rope.get("original_max_position_embeddings", hf["max_position_embeddings"]),
        )
    return Config(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        **scaling,
        **overrides,
    )


def config_to_hf(cfg: Config) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor is not None:
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_block_size,
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_size": cfg.n_embd,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "rope_parameters": rope,  # the transformers >= 5 spelling
        "attention_bias": False,
        "mlp_bias": False,
    }


def read_config(path, **overrides) -> Config:
    return config_from_hf(json.loads((Path(path) / "config.json").read_text()), **overrides)


# -----------------------------------------------------------------------------
# Weight names <-> ours

# Hugging Face Llama names -> ours (each with a ".weight"). HF's converter already permuted Meta's
# q/k rows into the rotate-half layout of apply_rope, so every tensor copies across unchanged.
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
HF_TOP_NAMES = {"tok_emb": "embed_tokens", "norm": "norm"}


def hf_to_ours(hf_state, cfg):
    # checkpoints saved from LlamaModel have no "model." prefix; drop RoPE tables (ours come from cfg)
    hf = {k.removeprefix("model."): v for k, v in hf_state.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    out = {}
    for ours, theirs in HF_TOP_NAMES.items():
        if f"{theirs}.weight" in hf:
            out[f"{ours}.weight"] = hf.pop(f"{theirs}.weight")
    for i in range(cfg.n_layer):
        for ours, theirs in HF_LAYER_NAMES.items():
            if f"layers.{i}.{theirs}.weight" in hf:
                out[f"layers.{i}.{ours}.weight"] = hf.pop(f"layers.{i}.{theirs}.weight")
    if "lm_head.weight" in hf:
        lm_head = hf.pop("lm_head.weight")
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = lm_head
    if cfg.tie_embeddings and "tok_emb.weight" in out:
        out["lm_head.weight"] = out["tok_emb.weight"]
    out.update(hf)  # leftovers keep their HF names and surface as unexpected keys
    return out


def ours_to_hf(state, cfg):
    hf = {}
    for ours, theirs in HF_TOP_NAMES.items():
        hf[f"model.{theirs}.weight"] = state[f"{ours}.weight"]
    for i in range(cfg.n_layer):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in HF_LAYER_NAMES.items():
            hf[b + theirs + ".weight"] = state[a + ours + ".weight"]
    if not cfg.tie_embeddings:  # tied: HF re-ties lm_head to embed_tokens on load
        hf["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in hf.items()}


# -----------------------------------------------------------------------------
# Safetensors directories: one model.safetensors, or shards + model.safetensors.index.json


def read_safetensors_dir(path):
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


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


def load_state_dict_strict(model, state):
    """load_state_dict that names every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise KeyError(
            "checkpoint does not match the model:"
            + (f"\n  missing keys: {missing}" if missing else "")
            + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {shapes}" if shapes else "")
        )
    model.load_state_dict(state)


# -----------------------------------------------------------------------------
# Entry points: Transformer.from_pretrained and Transformer.save_pretrained call these


def load(path, **overrides) -> Transformer:
    """A Hugging Face directory -> our model; overrides replace Config fields (e.g. attn_impl)."""
    cfg = read_config(path, **overrides)
    model = Transformer(cfg)
    load_state_dict_strict(model, hf_to_ours(read_safetensors_dir(path), cfg))
    return model


def save(model, path, max_shard_bytes=5 * 2**30):
    """Our model -> a Hugging Face directory that transformers' from_pretrained loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    write_safetensors_dir(path, ours_to_hf(model.state_dict(), model.cfg), max_shard_bytes)
