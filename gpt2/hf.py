"""GPT-2 checkpoints in the Hugging Face format: a directory with config.json (the fields of
transformers' `GPT2Config`) and the weights of `GPT2LMHeadModel` in model.safetensors, or in
numbered shards listed by model.safetensors.index.json. Reads what transformers 4.x and >= 5
save, the hub's original openai-community/gpt2* checkpoints included (their config.json
spelling has not changed); writes what both versions load.

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

from .model import Config, Transformer

# -----------------------------------------------------------------------------
# config.json <-> Config


def config_from_hf(hf: dict, **overrides) -> Config:
    n_embd = hf["n_embd"]
    return Config(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        **overrides,
    )


def config_to_hf(cfg: Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_inner": cfg.intermediate_size,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


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

# Hugging Face GPT-2 names -> ours. HF fuses q, k, v into `c_attn` and stores every Linear as a
# Conv1D, whose weight is (in, out): the transpose of nn.Linear's (out, in).
HF_LAYER_NAMES = {
    "attn_norm": "ln_1",
    "attn.wo": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.w1": "mlp.c_fc",
    "mlp.w2": "mlp.c_proj",
}
HF_TOP_NAMES = {"tok_emb": "wte", "pos_emb": "wpe", "norm": "ln_f"}


def hf_to_ours(hf_state, cfg):
    # checkpoints saved from GPT2Model have no "transformer." prefix; drop HF's mask buffers
    hf = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    out = {}
    for ours, theirs in HF_TOP_NAMES.items():
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in hf:
                out[f"{ours}.{p}"] = hf.pop(f"{theirs}.{p}")
    for i in range(cfg.n_layer):
        a, b = f"layers.{i}.", f"h.{i}."
        if b + "attn.c_attn.weight" in hf:
            qkv_w = hf.pop(b + "attn.c_attn.weight").t()  # (3 * n_embd, n_embd)
            qkv_b = hf.pop(b + "attn.c_attn.bias")
            for name, w, bias in zip(("wq", "wk", "wv"), qkv_w.chunk(3), qkv_b.chunk(3)):
                out[f"{a}attn.{name}.weight"], out[f"{a}attn.{name}.bias"] = w, bias
        for ours, theirs in HF_LAYER_NAMES.items():
            is_conv1d = "norm" not in ours
            if b + theirs + ".weight" in hf:
                w = hf.pop(b + theirs + ".weight")
                out[a + ours + ".weight"] = w.t() if is_conv1d else w
            if b + theirs + ".bias" in hf:
                out[a + ours + ".bias"] = hf.pop(b + theirs + ".bias")
    if "lm_head.weight" in hf:
        lm_head = hf.pop("lm_head.weight")
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = lm_head
    if cfg.tie_embeddings and "tok_emb.weight" in out:
        out["lm_head.weight"] = out["tok_emb.weight"]
    out.update(hf)  # leftovers keep their HF names and surface as unexpected keys
    return out


def ours_to_hf(state, cfg):
    # the rows padding the vocabulary for aligned matmuls (Config.vocab_multiple) are never predicted: dropped
    state = {k: v[: cfg.vocab_size] if k in ("tok_emb.weight", "lm_head.weight") else v for k, v in state.items()}
    hf = {}
    for ours, theirs in HF_TOP_NAMES.items():
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in state:
                hf[f"transformer.{theirs}.{p}"] = state[f"{ours}.{p}"]
    for i in range(cfg.n_layer):
        a, b = f"layers.{i}.", f"transformer.h.{i}."
        hf[b + "attn.c_attn.weight"] = torch.cat([state[f"{a}attn.{n}.weight"] for n in ("wq", "wk", "wv")]).t()
        hf[b + "attn.c_attn.bias"] = torch.cat([state[f"{a}attn.{n}.bias"] for n in ("wq", "wk", "wv")])
        for ours, theirs in HF_LAYER_NAMES.items():
            w = state[a + ours + ".weight"]
            hf[b + theirs + ".weight"] = w if "norm" in ours else w.t()
            hf[b + theirs + ".bias"] = state[a + ours + ".bias"]
    if not cfg.tie_embeddings:  # tied: HF re-ties lm_head to wte on load
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
