"""Llama 3.1 and 3.2 checkpoints in the Hugging Face format: a directory with config.json (the
fields of transformers' `LlamaConfig`) and the weights of `LlamaForCausalLM` in model.safetensors,
or in numbered shards listed by model.safetensors.index.json. Reads both spellings of the RoPE
settings, transformers >= 5's `rope_parameters` and the 4.x `rope_theta` + `rope_scaling` of the
hub's meta-llama/* configs; writes the >= 5 spelling, which transformers 4.x also loads.
`load` also reads Meta's own format (params.json + consolidated.NN.pth, no config.json), checked
against Meta's reference model in llama-models (tests/test_meta_llama.py).

Nothing here is architecture: model.py never meets a Hugging Face name. Sections, in the same
order in every model's hf.py: config.json <-> Config; weight names <-> ours; safetensors
directories; strict loading; `load` and `save`, behind `Transformer.from_pretrained` and
`Transformer.save_pretrained`.
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

from .model import Config, Transformer, ffn_hidden_size

# -----------------------------------------------------------------------------
# config.json <-> Config


def config_from_hf(hf: dict, **overrides) -> Config:
    # transformers >= 5 writes rope_parameters (rope_theta inside); older configs, including
    # Meta's published ones, write rope_theta beside a rope_scaling dict
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", "yarn"):
        raise ValueError(
            f"config.json rope_type {rope_type!r} is not supported; Llama 3 uses 'llama3', 'yarn' or 'default'"
        )
    scaling = dict(rope_factor=None)
    if rope_type == "llama3":
        scaling = dict(
            rope_factor=rope["factor"],
            rope_low_freq_factor=rope["low_freq_factor"],
            rope_high_freq_factor=rope["high_freq_factor"],
            rope_original_block_size=rope.get("original_max_position_embeddings", hf["max_position_embeddings"]),
        )
    if rope_type == "yarn":
        scaling = yarn_from_hf(rope, hf)
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
    if cfg.rope_factor is not None and cfg.rope_type == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_block_size,
        )
    if cfg.rope_factor is not None and cfg.rope_type == "yarn":
        rope.update(yarn_to_hf(cfg))
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


def yarn_from_hf(rope: dict, hf: dict) -> dict:
    """Config fields of a YaRN rope_parameters / rope_scaling dict, with transformers' defaults."""
    if rope.get("attention_factor") is None and rope.get("mscale") and rope.get("mscale_all_dim"):
        raise ValueError(
            "config.json sets YaRN's mscale and mscale_all_dim (DeepSeek's attention factor), which this "
            "model does not implement; give attention_factor instead"
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
        rope_attention_factor=rope.get("attention_factor"),
        rope_truncate=rope.get("truncate", True),
    )


def yarn_to_hf(cfg: Config) -> dict:
    yarn = dict(
        rope_type="yarn",
        factor=cfg.rope_factor,
        original_max_position_embeddings=cfg.rope_original_block_size,
        beta_fast=cfg.rope_beta_fast,
        beta_slow=cfg.rope_beta_slow,
    )
    if cfg.rope_attention_factor is not None:
        yarn["attention_factor"] = cfg.rope_attention_factor
    if not cfg.rope_truncate:  # written only when off: transformers 4.x warns about a key it does not know
        yarn["truncate"] = False
    return yarn


def read_config(path, **overrides) -> Config:
    hf = json.loads((Path(path) / "config.json").read_text())
    try:
        return config_from_hf(hf, **overrides)
    except KeyError as e:  # a field that is not there: one line naming the file, not a bare KeyError
        raise CheckpointError(
            f"{Path(path) / 'config.json'}: no {e.args[0]!r} field, which this loader needs"
        ) from None


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
        slices = {name: opened[f].get_slice(name) for f, name in names}
        whole = {name: functools.partial(opened[f].get_tensor, name) for f, name in names}
        renamed, stacked, transformed = plan_conversion({n: s.get_shape() for n, s in slices.items()}, cfg)
        part = {}
        read = {}  # (HF name, rows) -> tensor: a tied head is the embedding's rows, read once
        for ours, theirs in renamed.items():
            shape = torch.Size(slices[theirs].get_shape())
            rows = rows_of(ours, shape)
            if (theirs, rows) not in read:
                read[theirs, rows] = slices[theirs][rows[0] : rows[1]] if rows else whole[theirs]()
            part[ours] = (shape, read[theirs, rows])
        for ours, parts in stacked.items():
            shape = torch.Size([len(parts), *slices[parts[0]].get_shape()])
            start, stop = rows_of(ours, shape) or (0, len(parts))
            empty = slices[parts[0]][0:0].new_empty((0, *shape[1:]))  # a process left without rows
            part[ours] = (shape, torch.stack([whole[n]() for n in parts[start:stop]]) if stop > start else empty)
        for ours, tensor in hf_to_ours({n: whole[n]() for n in transformed}, cfg).items():
            if ours not in part:
                rows = rows_of(ours, tensor.shape)
                part[ours] = (tensor.shape, tensor[rows[0] : rows[1]].clone() if rows else tensor)
    return part


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
# Meta's original format: params.json + consolidated.NN.pth (+ tokenizer.model), as Meta publishes
# Llama 3 (the "original/" folder of the hub repos) and as llama-models' reference model loads it

META_PARAMS, META_SHARDS = "params.json", "consolidated.*.pth"
# ours -> Meta's names (each with a ".weight")
META_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn.wq": "attention.wq",
    "attn.wk": "attention.wk",
    "attn.wv": "attention.wv",
    "attn.wo": "attention.wo",
    "mlp_norm": "ffn_norm",
    "mlp.w1": "feed_forward.w1",
    "mlp.w2": "feed_forward.w2",
    "mlp.w3": "feed_forward.w3",
}
META_TOP_NAMES = {"tok_emb": "tok_embeddings", "norm": "norm", "lm_head": "output"}
# Model-parallel shards (consolidated.00.pth, .01, ...: one per rank of fairscale's layers) cut a
# column-parallel matrix (and Llama 3's VocabParallelEmbedding) along its rows, a row-parallel one
# (wo, w2) along its columns; the norms are whole in every shard
META_SPLIT_DIM = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
# Meta's reference (llama-models, apply_scaling) fixes Llama 3.1's RoPE scaling but the factor
META_ROPE = dict(rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_block_size=8192)


def is_meta_dir(path) -> bool:
    path = Path(path)
    return not (path / "config.json").exists() and (path / META_PARAMS).exists()


def config_from_meta(params: dict, **overrides) -> Config:
    """params.json -> Config. Meta's file lists the FFN width rule, not the width, and no context
    length (its reference takes max_seq_len as an argument): 128K with scaled RoPE, else 8K."""
    if params.get("vision_chunk_size", -1) > 0 or "vision_model" in params or "moe_args" in params:
        raise ValueError(f"{META_PARAMS} describes a vision or MoE model; only the text-only Llama 3 is supported")
    scaling = dict(rope_factor=None)
    if params.get("use_scaled_rope", False):
        # Meta's Llama 3 reference scales by 8, also for Llama 3.2, whose Hugging Face config.json says
        # 32: pass rope_factor=32.0 to match that; a params.json that names its factor is followed
        scaling = dict(rope_factor=float(params.get("rope_scaling_factor") or 8.0), **META_ROPE)
    dim = params["dim"]
    return Config(
        **{
            "vocab_size": params["vocab_size"],
            "block_size": 131072 if scaling["rope_factor"] else 8192,
            "n_layer": params["n_layers"],
            "n_head": params["n_heads"],
            "n_kv_heads": params.get("n_kv_heads") or params["n_heads"],
            "n_embd": dim,
            "intermediate_size": ffn_hidden_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
            "norm_eps": params.get("norm_eps", 1e-5),
            "rope_theta": params.get("rope_theta", 500000.0),
            **scaling,
            **overrides,
        }
    )


def config_to_meta(cfg: Config) -> dict:
    """Config -> params.json. Meta's file has no intermediate_size: the caller checks the rule gives ours."""
    if cfg.rope_factor is not None and any(getattr(cfg, k) != v for k, v in META_ROPE.items()):
        raise ValueError(f"Meta's format fixes RoPE scaling's {META_ROPE}; this Config differs")
    params = dict(dim=cfg.n_embd, n_layers=cfg.n_layer, n_heads=cfg.n_head, n_kv_heads=cfg.n_kv_heads)
    params.update(vocab_size=cfg.vocab_size, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta)
    params.update(use_scaled_rope=cfg.rope_factor is not None)
    if cfg.rope_factor not in (None, 8.0):
        params["rope_scaling_factor"] = cfg.rope_factor
    # the FFN width rule with multiple_of = intermediate_size returns it when 2/3 of 4 n_embd is below
    # it, else a multiplier does; ffn_hidden_size confirms the pair below
    params.update(multiple_of=cfg.intermediate_size, ffn_dim_multiplier=cfg.intermediate_size / int(8 * cfg.n_embd / 3))
    if ffn_hidden_size(cfg.n_embd, params["multiple_of"], params["ffn_dim_multiplier"]) != cfg.intermediate_size:
        raise ValueError(f"no multiple_of/ffn_dim_multiplier gives intermediate_size {cfg.intermediate_size}")
    return params


def interleave_pairs(w, n_heads):
    """Rows of wq/wk from our rotate-half layout (dim i of a head pairs with i + head_dim/2) to
    Meta's, where RoPE rotates neighbours 2i, 2i+1 (RoFormer eq. 34 as written): per head, the rows
    (0, h/2, 1, h/2+1, ...). The inverse of the permutation transformers' converter applies."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def split_pairs(w, n_heads):
    """Meta's wq/wk rows -> ours: per head the even rows, then the odd ones. q.k is unchanged when
    q and k are permuted alike, and rotating the pair (2i, 2i+1) becomes rotating (i, i + h/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_ours(meta_state, cfg):
    meta = {k: v for k, v in meta_state.items() if k != "rope.freqs"}  # Llama 2's saved RoPE table
    out = {}
    for ours, theirs in META_TOP_NAMES.items():
        if f"{theirs}.weight" in meta:
            out[f"{ours}.weight"] = meta.pop(f"{theirs}.weight")
    for i in range(cfg.n_layer):
        for ours, theirs in META_LAYER_NAMES.items():
            if f"layers.{i}.{theirs}.weight" in meta:
                out[f"layers.{i}.{ours}.weight"] = meta.pop(f"layers.{i}.{theirs}.weight")
        for ours, n_heads in (("attn.wq", cfg.n_head), ("attn.wk", cfg.n_kv_heads)):
            if (key := f"layers.{i}.{ours}.weight") in out:
                out[key] = split_pairs(out[key], n_heads)
    if cfg.tie_embeddings and "tok_emb.weight" in out:
        out["lm_head.weight"] = out["tok_emb.weight"]
    out.update(meta)  # leftovers keep Meta's names and surface as unexpected keys
    return out


def ours_to_meta(state, cfg):
    meta = {}
    for ours, theirs in META_TOP_NAMES.items():
        if ours != "lm_head" or not cfg.tie_embeddings:  # tied: Llama 3.2's files have no output.weight
            meta[f"{theirs}.weight"] = state[f"{ours}.weight"]
    for i in range(cfg.n_layer):
        for ours, theirs in META_LAYER_NAMES.items():
            w = state[f"layers.{i}.{ours}.weight"]
            if ours in ("attn.wq", "attn.wk"):
                w = interleave_pairs(w, cfg.n_head if ours == "attn.wq" else cfg.n_kv_heads)
            meta[f"layers.{i}.{theirs}.weight"] = w
    return {k: v.detach().contiguous() for k, v in meta.items()}


def open_meta_shards(path, n_kv_heads):
    """consolidated.00.pth, ... memory-mapped (torch.load's mmap): a tensor's pages are read only
    when touched, so taking a slice of one reads just that slice."""
    files = sorted(Path(path).glob(META_SHARDS))
    if not files:
        raise FileNotFoundError(f"no {META_SHARDS} files in {path}")
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    if len(shards) > n_kv_heads:  # each shard's wk/wv would hold a copy of a head, in a layout we cannot check
        raise ValueError(
            f"{path}: {len(shards)} model-parallel shards but {n_kv_heads} key/value heads; reshard to at most"
            f" {n_kv_heads} (llama_models.checkpoint.reshard_mp) or use the Hugging Face conversion"
        )
    return shards


def read_meta_shards(path, n_kv_heads):
    """consolidated.00.pth, ... -> one state dict: each model-parallel slice concatenated back."""
    shards = open_meta_shards(path, n_kv_heads)
    return shards[0] if len(shards) == 1 else merge_meta_shards(shards, list(shards[0]))


def merge_meta_shards(shards, keys):
    """The tensors named keys, each model-parallel slice concatenated back."""
    state = {}
    for key in keys:
        first = shards[0][key]
        parts = [s[key] for s in shards]
        dim = META_SPLIT_DIM.get(key.split(".")[-2]) if key.endswith(".weight") and first.dim() == 2 else None
        if dim is None:  # norms: a whole copy in every shard
            state[key] = first
            continue
        state[key] = torch.cat(parts, dim=dim)
    return state


def load_meta(path, **overrides) -> Transformer:
    """Meta's directory -> our model. Without output.weight (Llama 3.2 1B/3B) lm_head is tied."""
    params = json.loads((Path(path) / META_PARAMS).read_text())
    state = read_meta_shards(path, params.get("n_kv_heads") or params["n_heads"])
    cfg = config_from_meta(params, **{"tie_embeddings": "output.weight" not in state, **overrides})
    model = Transformer(cfg)
    load_state_dict_strict(model, meta_to_ours(state, cfg))
    return model


def read_meta_config(path) -> Config:
    """params.json -> Config, lm_head tied when the shards have no output.weight (Llama 3.2 1B/3B)."""
    params = json.loads((Path(path) / META_PARAMS).read_text())
    shards = open_meta_shards(path, params.get("n_kv_heads") or params["n_heads"])
    return config_from_meta(params, tie_embeddings="output.weight" not in shards[0])


def read_meta_layers_as_ours(path, cfg, rows_of=lambda name, shape: None):
    """read_layers_as_ours for Meta's directory: one layer at a time from the memory-mapped shards,
    so a process that keeps rows start:stop touches (reads) only their pages of a tensor that is
    only renamed. wq/wk are permuted (split_pairs) and model-parallel parts concatenated, so those
    are read whole for their layer first."""
    shards = open_meta_shards(path, cfg.n_kv_heads)
    layers = {}  # layer number (-1: outside the layers) -> Meta names
    for key in shards[0]:
        number = re.search(r"\.(\d+)\.", key)
        layers.setdefault(int(number[1]) if number else -1, []).append(key)
    for _, keys in sorted(layers.items()):
        yield meta_layer_as_ours(shards, keys, cfg, rows_of)


def meta_layer_as_ours(shards, keys, cfg, rows_of):
    """One layer of read_meta_layers_as_ours; a function of its own so that the merged or permuted
    tensors are freed on return, not kept by the generator's locals while the next layer is read."""
    meta = {k: shards[0][k] for k in keys} if len(shards) == 1 else merge_meta_shards(shards, keys)
    part = {}
    for ours, tensor in meta_to_ours(meta, cfg).items():
        rows = rows_of(ours, tensor.shape)
        part[ours] = (tensor.shape, tensor[rows[0] : rows[1]] if rows else tensor)
    return part


def save_meta(model, path):
    """Our model -> Meta's directory (params.json + consolidated.00.pth), as llama-models loads it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / META_PARAMS).write_text(json.dumps(config_to_meta(model.cfg), indent=2))
    torch.save(ours_to_meta(model.state_dict(), model.cfg), path / "consolidated.00.pth")


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
    if is_meta_dir(path):  # diff vs gpt2: Meta also publishes Llama 3 in its own format
        return load_meta(path, **overrides)
    check_checkpoint_dir(path, expected=f"config.json and *.safetensors, or Meta's {META_PARAMS} and {META_SHARDS}")
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
