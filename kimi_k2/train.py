"""Pretrain Kimi K2 on one CPU, one GPU, or many GPUs with DDP or FSDP2 — the same file for all.

    python kimi_k2/train.py                               # tiny model, bundled Shakespeare, CPU
    python kimi_k2/train.py --preset tiny_moe             # tiny DeepSeekMoE, one expert group as K2
    torchrun --nproc_per_node 8 kimi_k2/train.py --preset kimi_k2 --parallel fsdp --data-dir data/fineweb10B
    python kimi_k2/train.py --generate --prompt "ROMEO:"  # sample from the last checkpoint

Sections, in the same order in every model's train.py: arguments, distributed set-up, model and
wrapping, optimizer and schedule, data, checkpointing, the loop, a final sample.
Changes from deepseek3/train.py: MuonClip (K2 report sec. 2.1, Algorithm 1) replaces AdamW. `make_optimizer`
returns one optimizer: Muon (Nesterov momentum, Newton-Schulz orthogonalisation, update RMS matched to AdamW's
by 0.2 sqrt(max(A, B)), decoupled weight decay) for every hidden weight matrix, each routed expert's on its
own, and AdamW for the embedding, head, norms and router weights, at the same --lr and --weight-decay; under
FSDP each 2-D matrix is gathered whole to be orthogonalised. `TrainingExtras` keeps DeepSeek-V3's bias
balancing and adds QK-Clip: after each optimizer step, every head whose largest pre-softmax logit of the step
(S_max, reported by the model's forward, the max over micro-batches and ranks) exceeded tau = 100 has its
query and key weights scaled so that its logits shrink by tau / S_max. No MTP module in K2, so no MTP loss.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import sys
import time
import typing
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from kimi_k2 import hf
from kimi_k2.model import LOSS_CHUNK_ELEMENTS, Config, Transformer
from shared.data import DataError, DataLoader, check_tokenizer, default_corpus, fsync_dir
from shared.tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# Arguments


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad argument is one line, not the usage block and then the error."""
        raise SystemExit(f"{self.prog}: {message} (see --help)")


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=36),
    )
    m = p.add_argument_group("model")
    # SUPPRESS: no default in args, so an explicit --preset can be told from the default one
    m.add_argument("--preset", default=argparse.SUPPRESS, choices=Config.PRESETS, help="model size (default: tiny)")
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a Config field of the preset, e.g. --set n_layer=2 (repeatable)",
    )
    m.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from a Hugging Face checkpoint directory instead, or for Llama Meta's own (params.json + "
        "consolidated.*.pth); its config is the architecture, so not with --preset or --set",
    )
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward pass to save memory",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-dir",
        help="directory of *_train_*.bin / *_val_*.bin token shards "
        "(default: the bundled Shakespeare, prepared into data/shakespeare on first use)",
    )
    d.add_argument(
        "--tokenizer",
        default="gpt2",
        help="'gpt2', or a directory or file with tokenizer.json or tiktoken ranks (Meta's tokenizer.model)",
    )
    d.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch per process")
    d.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (at most the model's block_size)")
    d.add_argument(
        "--total-batch-tokens",
        type=int,
        default=argparse.SUPPRESS,
        help="tokens per optimizer step over all processes; reached by gradient accumulation "
        "(default: the preset's published recipe, else one micro-batch per process)",
    )
    o = p.add_argument_group("optimizer")
    o.add_argument(
        "--lr",
        type=float,
        default=argparse.SUPPRESS,
        help="peak learning rate (default: the preset's published recipe, else 4e-3)",
    )
    o.add_argument(
        "--min-lr-ratio",
        type=float,
        default=argparse.SUPPRESS,
        help="final learning rate as a fraction of --lr (default: as --lr; 0.1)",
    )
    o.add_argument("--warmup-steps", type=int, default=argparse.SUPPRESS, help="linear warmup (default: as --lr; 20)")
    o.add_argument(
        "--schedule",
        default="cosine",
        choices=("cosine", "wsd"),
        help="cosine decay, or warmup-stable-decay (linear decay over the last --decay-frac)",
    )
    o.add_argument("--decay-frac", type=float, default=0.2, help="wsd: fraction of steps spent decaying")
    o.add_argument(
        "--weight-decay",
        type=float,
        default=argparse.SUPPRESS,
        help="applied to matrices only, not norms or biases (default: as --lr; 0.1)",
    )
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.95)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0 disables)")
    r = p.add_argument_group("run")
    r.add_argument("--max-steps", type=int, default=250, help="optimizer steps (sets the LR schedule's length)")
    r.add_argument(
        "--stop-after",
        type=int,
        help="end this run after N steps, checkpointed, to --resume later "
        "(splits a run across time-limited jobs without changing the schedule)",
    )
    r.add_argument("--eval-every", type=int, default=50, help="steps between validation runs (0: only at the end)")
    r.add_argument("--eval-steps", type=int, default=10, help="validation batches per run")
    r.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    r.add_argument("--seed", type=int, default=1337)
    r.add_argument(
        "--out-dir",
        default=str(Path("out") / Path(__file__).parent.name),  # out/<model>
        help="checkpoints and metrics.jsonl go here",
    )
    r.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    r.add_argument(
        "--parallel",
        default="none",
        choices=("none", "ddp", "fsdp"),
        help="data parallelism under torchrun: DDP replicates the model, FSDP2 shards it",
    )
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    r.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="compute dtype; auto = bfloat16 mixed precision on GPU, float32 on CPU",
    )
    r.add_argument("--peak-tflops", type=float, help="hardware peak for MFU (default: known GPUs; none on CPU)")
    s = p.add_argument_group("sampling")
    s.add_argument("--generate", action="store_true", help="only sample from the checkpoint (or --init-from)")
    s.add_argument("--prompt", default="\n", help="text the sample starts from")
    s.add_argument("--sample-tokens", type=int, default=200, help="tokens to sample at the end (0: none)")
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=200)
    args = p.parse_args(argv)
    if args.init_from and (hasattr(args, "preset") or args.set):
        p.error("--init-from takes the architecture from its config.json: drop --preset and --set")
    args.preset = getattr(args, "preset", "tiny")
    apply_training_defaults(args)
    if args.resume and args.init_from:
        p.error("--resume and --init-from are exclusive: a checkpoint already holds the weights")
    check_args(args, p)
    return args


# Published recipes of the real presets, used for each of these flags not given on the command line.
# DeepSeek-V3 report sec. 4.2 (the 671B model): AdamW beta1 0.9, beta2 0.95 (train.py's defaults), weight
# decay 0.1, gradient clipping 1.0 (the default); lr 2.2e-4 after 2K warmup steps, decayed to 2.2e-5; 15,360
# sequences of 4K tokens per step. Not expressible here, so left out: the schedule's shape (constant until
# 10T tokens, cosine over 4.3T, then constant 2.2e-5 and 7.3e-6: pass --schedule wsd for the nearest), the
# batch-size ramp from 3,072 sequences over the first 469B tokens, --seq-len 4096 (pass it), and the late
# switches gamma 0.001 -> 0 and lambda 0.3 -> 0.1 (Config fields: --set). deepseek_v3_16b has no published
# recipe: it keeps the small-run defaults.
TRAINING_DEFAULTS = {
    "deepseek_v3": dict(
        lr=2.2e-4, warmup_steps=2000, total_batch_tokens=15360 * 4096, min_lr_ratio=0.1, weight_decay=0.1
    ),
}


# What those flags are when neither the command line nor the preset's recipe sets them: a small run's
SMALL_RUN_DEFAULTS = dict(lr=4e-3, warmup_steps=20, total_batch_tokens=None, min_lr_ratio=0.1, weight_decay=0.1)


def apply_training_defaults(args):
    """Fill each of SMALL_RUN_DEFAULTS' flags not given (SUPPRESS: absent) from the preset's published recipe, else
    the small-run default; args.recipe keeps what came from the recipe, for the start-up log."""
    recipe = {} if args.init_from else TRAINING_DEFAULTS.get(args.preset, {})
    args.recipe = {}
    for name, fallback in SMALL_RUN_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, recipe.get(name, fallback))
            if name in recipe:
                args.recipe[name] = recipe[name]


def check_args(args, p):
    """Refuse, up front and in one line, a value that would crash later or silently do nothing.
    Each rule is written so that nan fails it too."""
    rules = [
        ("batch_size seq_len max_steps eval_steps log_every top_k", lambda v: v >= 1, "at least 1"),
        ("total_batch_tokens stop_after", lambda v: v is None or v >= 1, "at least 1"),
        ("warmup_steps eval_every ckpt_every sample_tokens", lambda v: v >= 0, "0 or more"),
        ("lr", lambda v: 0 < v < math.inf, "a positive number"),
        ("peak_tflops", lambda v: v is None or 0 < v < math.inf, "a positive number"),
        ("weight_decay grad_clip temperature", lambda v: 0 <= v < math.inf, "0 or more"),
        ("min_lr_ratio decay_frac", lambda v: 0 <= v <= 1, "between 0 and 1"),
        ("beta1 beta2", lambda v: 0 <= v < 1, "at least 0 and below 1"),
    ]
    for names, ok, rule in rules:
        for name in names.split():
            if not ok(getattr(args, name)):
                p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {rule}")


def config_from_args(args):
    if args.init_from:
        return pretrained_config(args.init_from)
    try:
        return Config.from_preset(args.preset, **parse_overrides(args.set))
    except ValueError as e:  # a bad --set or a Config check: one line, no traceback
        raise SystemExit(str(e)) from None


def pretrained_config(path):
    """The Config in a Hugging Face directory's config.json (or Meta's params.json, where this model
    is published in Meta's layout: hf.is_meta_dir), or one line saying why there is none."""
    file = Path(path) / "config.json"
    if hf.is_meta_dir(path):
        try:
            return hf.read_meta_config(path)
        except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
            raise SystemExit(f"--init-from {path}: not a Meta checkpoint we can read ({e})") from None
    if not file.is_file():
        raise SystemExit(f"--init-from {path}: no config.json there (expected a Hugging Face checkpoint directory)")
    ours = hf.config_to_hf(Config.from_preset("tiny"))["model_type"]
    try:
        theirs = json.loads(file.read_text()).get("model_type")
        if not str(theirs).startswith(ours):  # qwen3 reads both qwen3 and qwen3_moe
            raise SystemExit(
                f"--init-from {path}: config.json has model_type {theirs!r}; this train.py trains {ours!r}"
            )
        return hf.read_config(path)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SystemExit(f"--init-from {path}: config.json is not a {ours!r} config we can read ({e!r})") from None


def parse_overrides(items):
    """["n_layer=2", "norm_eps=1e-6"] -> {"n_layer": 2, "norm_eps": 1e-6}: --set's FIELD=VALUE strings,
    each value parsed as its Config field's type. bench/ parses its --set with this too."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        try:
            overrides[name] = parse_field(types[name], value)
        except ValueError:
            type_name = getattr(types[name], "__name__", str(types[name]))
            raise ValueError(f"--set {item!r}: {value!r} is not a valid {type_name}") from None
    return overrides


def parse_field(field_type, value: str):
    """One command-line string as a Config field's type: int, float, bool, str, X | None, or a
    tuple written comma-separated ("1,3"; "" is the empty tuple)."""
    if typing.get_origin(field_type) is tuple:
        item_type = typing.get_args(field_type)[0]
        return tuple(item_type(v) for v in value.split(",") if v.strip())
    options = typing.get_args(field_type) or (field_type,)
    if type(None) in options and value.lower() == "none":
        return None
    base = next(t for t in options if t is not type(None))
    if base is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(value)
        return value.lower() in ("true", "1")
    return base(value)


# -----------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK/WORLD_SIZE; otherwise this is one process


def setup_distributed(args):
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.parallel == "none" and world_size > 1:
        raise SystemExit(f"launched with {world_size} processes: pass --parallel ddp or --parallel fsdp")
    if args.parallel != "none" and "RANK" not in os.environ:
        raise SystemExit(
            f"--parallel {args.parallel} needs torchrun, e.g. torchrun --nproc_per_node 2 {sys.argv[0]} ..."
        )
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def all_mean(x: torch.Tensor):
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.device.type == "cuda" else dist.ReduceOp.SUM)
        if x.device.type != "cuda":  # gloo has no AVG
            x /= dist.get_world_size()
    return x


# -----------------------------------------------------------------------------
# Model and wrapping


def build_model(args, cfg, device, compute_dtype):
    """Built on the meta device (shapes, no storage), wrapped, then allocated, as torchtitan does:
    activation checkpointing -> per-block compile -> FSDP2 groups -> to_empty -> the initial values
    (or --init-from's weights). Under FSDP each process only ever allocates its shard."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for block in [*model.layers, *mtp_modules(model)]:  # an MTP module, a block with its projections, as one
        if args.activation_checkpointing:  # keeps parameter names unchanged, unlike a wrapper module
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if args.compile:  # each block in place: no `_orig_mod.` in the names, and FSDP's hooks between blocks
            block.compile()
    if args.parallel == "fsdp":
        shard_model(model, compute_dtype)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module a tensor of its own, which unties a shared one
        model.lm_head.weight = model.tok_emb.weight
    with torch.no_grad():
        if args.init_from:
            load_pretrained(model, args.init_from)
        else:
            init_parameters(model)
    model.init_buffers()  # to_empty left them uninitialised
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, model  # (the plain module, for state dicts and generation; what the loop calls)


def shard_model(model, compute_dtype):
    """FSDP2 groups, each gathered just before its forward and freed after: the embedding, each block,
    each multi-token-prediction module (DeepSeek-V3's model.mtp), each router with a bias (in fp32), the
    final norm with the head, and a root for what is left (GPT-2's positions). A tied head shares the
    embedding's matrix, and so its group."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # params stored in fp32 and gathered in the compute dtype; gradients reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    head = [model.norm, model.lm_head]
    fully_shard([model.tok_emb, *head] if model.cfg.tie_embeddings else model.tok_emb, mp_policy=mp)
    for router in biased_routers(model):  # inner groups first: each then leaves its block's group
        fully_shard(router, mp_policy=dataclasses.replace(mp, param_dtype=torch.float32, cast_forward_inputs=False))
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    for module in mtp_modules(model):  # a block of its own and its projections, run after the main blocks
        fully_shard(module, mp_policy=mp)
    if not model.cfg.tie_embeddings:
        fully_shard(head, mp_policy=mp)
    # the root's inputs are token ids, nothing to cast; and casting would pass the forward a copy of the loop's
    # aux dict (FSDP rebuilds every dict it casts), leaving the loop's own empty: no expert load, no bias update
    fully_shard(model, mp_policy=dataclasses.replace(mp, cast_forward_inputs=False))


def biased_routers(model):
    """The MoE routers with a selection bias (DeepSeek-V3's, report sec. 2.1.2), which FSDP gathers in fp32,
    each its own group: the bias moves by gamma = 0.001 a step, below bf16's spacing of 0.004 near 1, so a
    bf16 copy would route by a bias that lags its updates. The router computes in fp32 anyway."""
    return [m.router for m in model.modules() if getattr(getattr(m, "router", None), "bias", None) is not None]


def mtp_modules(model):
    """The model's multi-token-prediction modules (DeepSeek-V3 report sec. 2.2), in order; none elsewhere."""
    return list(getattr(model, "mtp", None) or ())


def local_part(full, param):
    """This process's part of the full tensor `full`: all of it, or the rows FSDP gave it of `param`."""
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def init_parameters(model):
    """The model's initial values, the same on any number of processes: a sharded parameter is drawn
    full-size (one at a time, in reset_parameters' order, from the same seed) and each process keeps
    its rows, so the random stream is a single process's. Peak: one parameter beyond the shard."""
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            full = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)
            model.init_parameter(name, full)
            p.to_local().copy_(local_part(full, p))
        else:
            model.init_parameter(name, p)


def load_pretrained(model, path):
    """--init-from: the checkpoint read one layer at a time in our names (hf.read_layers_as_ours, or
    hf.read_meta_layers_as_ours for Meta's layout), each FSDP process reading only its rows of each
    tensor the conversion just renames: peak memory is the shard plus at most one transformed layer."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    read_layers = hf.read_meta_layers_as_ours if hf.is_meta_dir(path) else hf.read_layers_as_ours
    found = {}
    for part in read_layers(path, model.cfg, functools.partial(rows_kept, model)):
        found.update(copy_part(model, part, expected))
        part.clear()  # else the loop variable keeps this layer alive while the next one is read
    problems = hf.mismatches(expected, found)
    if problems:
        raise SystemExit(f"--init-from {path}: the checkpoint does not match its config's model: {problems}")


def copy_part(model, part, expected):
    """Copy each tensor of part ({name: (full shape, this process's rows)}) whose shape the model
    expects into its parameter; returns {name: full shape} for the mismatch check."""
    for name, (shape, tensor) in part.items():
        if expected.get(name) == shape:
            p = model.get_parameter(name)
            (p.to_local() if isinstance(p, DTensor) else p).copy_(tensor)
    return {name: shape for name, (shape, _) in part.items()}


def rows_kept(model, name, shape):
    """(start, stop): the rows of dim 0 this process keeps of parameter `name` (full shape `shape`)
    when FSDP shards it; None when it keeps all (no FSDP, a buffer, a name the model lacks). FSDP2's
    Shard(0) splits as torch.chunk does: ceil(rows / processes) each, the last ones short or empty."""
    try:
        p = model.get_parameter(name)
    except AttributeError:
        return None
    if not isinstance(p, DTensor) or p.shape != shape:
        return None
    per_rank = math.ceil(shape[0] / p.device_mesh.size())
    start = min(shape[0], p.device_mesh.get_local_rank() * per_rank)
    stop = min(shape[0], start + per_rank)
    if stop - start != p.to_local().shape[0]:  # a placement other than Shard(0)
        raise RuntimeError(f"{name}: sharded as {p.placements}, not by rows as --init-from expects")
    return start, stop


def set_gradient_sync(wrapped, args, enabled):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of an accumulation. FSDP keeps
    syncing: each micro-batch's gradients are reduce-scattered into the sharded ones (as torchtitan
    does), which costs a collective per micro-batch but never holds a full set of fp32 gradients."""
    if args.parallel == "ddp":
        wrapped.require_backward_grad_sync = enabled


# -----------------------------------------------------------------------------
# Memory plan: what each process will hold, estimated from the meta model before anything is allocated


def memory_plan(model, args, world_size, compute_dtype):
    """Estimated bytes per process of a model built on the meta device (unwrapped, unsharded):
    {weights, gradients, optimizer, transient, activations}. Exact for the first three, which are
    counts of parameters; transient and activations are estimates (see their functions)."""
    shards = world_size if args.parallel == "fsdp" else 1
    numel = sum(local_numel(p, shards) for p in model.parameters())  # a tied matrix counts once
    return {
        "weights": 4 * numel,  # the fp32 master copy, sharded under FSDP
        # fp32, sharded under FSDP; DDP also copies them into its all-reduce buckets
        "gradients": 4 * numel * (2 if args.parallel == "ddp" else 1),
        # AdamW's two fp32 moments (Loshchilov & Hutter 2019, alg. 2) per parameter: make_optimizer's
        # optimizer, counted rather than built, since its state is only created at the first step
        "optimizer": 2 * 4 * numel,
        "transient": transient_bytes(model, args, compute_dtype),
        "activations": activation_bytes(model, args, compute_dtype),
    }


def local_numel(param, shards):
    """Elements of param on the process holding the most of it: FSDP2 splits dim 0 into `shards`
    equal parts, the last ones padded."""
    if shards == 1 or param.dim() == 0:
        return param.numel()
    return math.ceil(param.size(0) / shards) * (param.numel() // param.size(0))


def fsdp_groups(model):
    """Parameters in each FSDP2 group of shard_model: the embedding (with the head when tied), each
    block and each MTP module (less their biased routers), each biased router, the final norm with the
    head, and the root's rest."""
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    tied = model.cfg.tie_embeddings
    groups = [count(model.tok_emb, model.norm) if tied else count(model.tok_emb)]
    blocks = [*model.layers, *mtp_modules(model)]
    groups += [count(block) - count(*biased_routers(block)) for block in blocks]
    groups += [count(router) for router in biased_routers(model)]
    groups += [] if tied else [count(model.norm, model.lm_head)]
    return groups + [count(model) - sum(groups)]


def transient_bytes(model, args, compute_dtype):
    """Copies of the weights that live for a step: under FSDP, two groups gathered in the compute
    dtype (the running one and the prefetched next) and one group's unsharded fp32 gradients before
    their reduce-scatter; under autocast, its cache of every weight cast to the compute dtype."""
    size = compute_dtype.itemsize
    if args.parallel == "fsdp":
        return max(fsdp_groups(model)) * (2 * size + 4)
    return 0 if size == 4 else size * sum(p.numel() for p in model.parameters())


def activation_bytes(model, args, compute_dtype):
    """Tensors saved for backward in one micro-batch, plus the loss's chunk of logits. With
    --activation-checkpointing each block keeps only its input and one block at a time is recomputed;
    either way backward's gradients of one block's activations come on top (counted as one block more)."""
    cfg, tokens = model.cfg, args.batch_size * args.seq_len
    size = compute_dtype.itemsize
    # the residual stream's dtype: fp32 under autocast (fp32 weights), the compute dtype under FSDP's casts
    stream = size if args.parallel == "fsdp" else 4
    blocks = [block_bytes_per_token(block, cfg, size, stream) for block in model.layers]
    # an MTP module is checkpointed as a block is; it keeps two inputs, h and the next token's embedding
    mtps = [mtp_bytes_per_token(module, cfg, size, stream) for module in mtp_modules(model)]
    largest = max(blocks + mtps)
    if args.activation_checkpointing:
        per_token = stream * cfg.n_embd * (len(blocks) + 2 * len(mtps)) + 2 * largest
    else:
        per_token = sum(blocks) + sum(mtps) + largest
    # final norm, the head's input in the compute dtype (and each MTP module's); the loss holds one fp32
    # chunk of logits and, in backward, its gradient in fp32 and in the compute dtype
    per_token += norm_bytes(model.norm, cfg.n_embd, stream) + size * cfg.n_embd * (1 + len(mtps))
    chunk = min(tokens, max(1, LOSS_CHUNK_ELEMENTS // cfg.vocab_size)) * cfg.vocab_size  # as linear_cross_entropy
    return tokens * per_token + chunk * (4 + 4 + size)


def mtp_bytes_per_token(module, cfg, size, stream):
    """Bytes one token leaves saved in a multi-token-prediction module (DeepSeek-V3 sec. 2.2, eq. 21-23):
    the two norms, eh_proj's input (both halves), a block and its final norm. Its loss goes through the
    shared head, whose chunk of logits the main loss's reuses, one at a time."""
    d = cfg.n_embd
    total = norm_bytes(module.enorm, d, stream) + norm_bytes(module.hnorm, d, stream) + size * 2 * d
    return total + block_bytes_per_token(module.block, cfg, size, stream) + norm_bytes(module.norm, d, stream)


def norm_bytes(norm, width, stream):
    """Per token saved by a norm: LayerNorm keeps its input; our RMSNorm (no bias) also an fp32 copy."""
    return stream * width + (0 if getattr(norm, "bias", None) is not None else 4 * width)


def block_bytes_per_token(block, cfg, size, stream):
    """Bytes one token leaves saved for backward in a block, from its config (Config fields that
    differ between models read with getattr). SDPA keeps no T x T matrix, so this is linear in T."""
    d = cfg.n_embd
    total = norm_bytes(block.attn_norm, d, stream) + norm_bytes(block.mlp_norm, d, stream)
    total += attention_bytes_per_token(block.attn, cfg, size)
    mlp = block.mlp
    if hasattr(mlp, "router"):  # MoE: each token's top-k rows, gathered, through a SwiGLU expert
        k, hidden, experts = cfg.n_experts_per_tok, cfg.moe_intermediate_size, cfg.n_experts
        # input, gathered rows, expert gate/up/SiLU/product, weighted outputs; router probabilities
        # and the logits kept for the balancing loss, in fp32
        total += size * (d + k * (2 * d + 4 * hidden)) + 2 * 4 * experts
        # DeepSeekMoE's shared experts: one SwiGLU over every token (gate, up, SiLU(gate), product)
        total += size * 4 * hidden * getattr(cfg, "n_shared_experts", 0)
    elif hasattr(mlp, "w3"):  # SwiGLU: input, gate, up, SiLU(gate), their product
        total += size * (d + 4 * cfg.intermediate_size)
    else:  # GELU MLP: input, the hidden before and after the GELU
        total += size * (d + 2 * cfg.intermediate_size)
    return total


def attention_bytes_per_token(attn, cfg, size):
    """Bytes one token leaves saved in attention: the projections' input, SDPA's q, k, v and output,
    and wo's input (a reshaped copy)."""
    d = cfg.n_embd
    if hasattr(attn, "wkv_a"):  # MLA (DeepSeek-V2 sec. 2.1), in the expanded form training runs
        q = cfg.n_head * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # q and k: per head, nope + rope dims
        v = cfg.n_head * cfg.v_head_dim
        # the q and kv latents: each RMSNorm keeps its input in fp32 and hands its up-projection its output
        latents = cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
        # SDPA's v is a view of wkv_b's output, which holds every head's k_nope too: kept whole
        v_storage = cfg.n_head * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        # q, k, v, SDPA's output and its fp32 log-sum-exp per head, wo's input
        return size * (d + 2 * q + v_storage + 2 * v) + 4 * cfg.n_head + (4 + 2 * size) * latents
    q = cfg.n_head * cfg.head_dim
    kv = getattr(cfg, "n_kv_heads", cfg.n_head) * cfg.head_dim
    total = size * (d + 3 * q + 2 * kv)
    if hasattr(attn, "q_norm"):  # QK-Norm: each an RMSNorm over the q and k heads
        total += (4 + size) * (q + kv)
    return total


GIB = 2**30


def gib(n):
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def describe_memory(plan, capacity, device):
    """The start-up log's line: each term of the plan and their total against the device's memory."""
    terms = ", ".join(f"{name} {gib(value)}" for name, value in plan.items())
    of = f"of {gib(capacity)} ({device})" if capacity else f"({device}: not checked)"
    return f"memory per process (estimate): {terms} = {gib(sum(plan.values()))} {of}"


def device_memory(device):
    """Bytes of memory of a CUDA device; None elsewhere (CPU memory is not checked)."""
    return torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None


def check_memory(plan, capacity, args, world_size, device):
    """Refuse, before anything is allocated, a run whose estimate exceeds the device's memory,
    naming its biggest term and what would shrink it."""
    total = sum(plan.values())
    if capacity is None or total <= capacity:
        return
    biggest = max(plan, key=plan.get)
    if biggest == "activations":
        fix = "a smaller --batch-size or --seq-len"
        fix += "" if args.activation_checkpointing else ", or --activation-checkpointing"
    elif args.parallel != "fsdp":
        fix = "--parallel fsdp, which shards weights, gradients and optimizer state over the processes"
    else:
        fix = f"more processes than {world_size} (e.g. torchrun --nnodes), or a smaller model"
    raise SystemExit(
        f"this run needs about {gib(total)} per process (estimate), more than the {gib(capacity)} of {device}; "
        f"the biggest term is {biggest} ({gib(plan[biggest])}): try {fix}"
    )


# -----------------------------------------------------------------------------
# What this model changes about training: the extension points. The loop calls them at fixed
# places in every model's train.py; `make_optimizer` and `TrainingExtras` are the only code that
# may differ between the copies (tests/test_copies.py checks the rest, and their signatures).


class TrainingExtras:
    """DeepSeek-V3's auxiliary-loss-free balancing (its report sec. 2.1.2), which K2 keeps, and MuonClip's
    QK-Clip (K2 report sec. 2.1, Algorithm 1). Each forward reports the tokens each routed expert received
    and, per layer and head, S_max, the largest pre-softmax attention logit; after each optimizer step the
    loads, summed over the step's micro-batches and the data-parallel ranks, move every MoE router's bias by
    gamma toward balance, and every head whose S_max (the max over the micro-batches and ranks) exceeds tau
    has its query and key weights scaled down so that its logits shrink by tau / S_max. All identically on
    every rank. Logs the balance loss, how evenly the experts were loaded and the largest S_max."""

    def __init__(self, model, args, device):
        cfg = model.cfg
        # the MoE layers, in the order of the rows of the forward's aux["expert_load"]: the main model's,
        # then the MTP blocks' (DeepSeek balances every MoE layer, the MTP module's included)
        blocks = [*model.layers, *(mtp.block for mtp in model.mtp)]
        self.moe_layers = [block.mlp for block in blocks if hasattr(block.mlp, "router")]
        self.gamma = cfg.bias_update_speed
        self.active_params = model.num_params(active=True)
        self.step_load = torch.zeros(len(self.moe_layers), cfg.n_experts, device=device)  # this step, this rank
        self.load = torch.zeros_like(self.step_load)  # all ranks, since the last summary
        # QK-Clip: the attention layers, in the order of the rows of the forward's aux["attn_logit_max"]
        self.attentions = [block.attn for block in model.layers]
        # K2 report sec. 2.1 and 4: tau = 100 for K2's pretraining, a threshold its logits reached early and
        # then stayed under once QK-Clip had brought them there; a Config field, so --set qk_clip_tau=30 works
        if not cfg.qk_clip_tau > 0:
            raise ValueError(f"Config.qk_clip_tau must be > 0, got {cfg.qk_clip_tau!r}")
        self.tau = cfg.qk_clip_tau
        self.step_logit_max = torch.full((cfg.n_layer, cfg.n_head), -math.inf, device=device)  # this step, rank
        self.logit_max = torch.full((), -math.inf, device=device)  # all heads and ranks, since the last summary
        # figure logged -> the aux key it averages
        self.figures = {"aux_loss": "load_balancing_loss", "mtp_loss": "mtp_loss"}
        self.sums = {name: torch.zeros((), device=device) for name in self.figures}
        self.counts = dict.fromkeys(self.figures, 0)

    def describe(self):
        return f" ({self.active_params:,} active per token)" if self.moe_layers else ""

    def after_forward(self, aux):
        if "expert_load" in aux:  # (MoE layers that ran, n_experts) (token, pick) pairs per expert
            load = aux["expert_load"]
            # a forward that skipped the MTP module (a 1-token sequence) reports the main layers' rows only:
            # the MTP rows get no load from it, and a router without load keeps its bias (sign(0) = 0)
            self.step_load[: load.size(0)] += load
        if "attn_logit_max" in aux:  # (n_layer, n_head) S_max of this micro-batch
            torch.maximum(self.step_logit_max, aux["attn_logit_max"], out=self.step_logit_max)
        for name, key in self.figures.items():
            if key in aux:
                self.sums[name] += aux[key]
                self.counts[name] += 1

    def after_step(self, model):
        """Balancing: b_i += gamma * sign(mean load - load_i) in each MoE layer (DeepSeek-V3 sec. 2.1.2): an
        overloaded expert's bias falls, an underloaded one's rises. QK-Clip (K2 Algorithm 1): a head h with
        S_max^h > tau gets gamma_h = tau / S_max^h, and its weights, as the optimizer left them, are scaled:
        q_nope's and k_nope's by sqrt(gamma_h), q_rope's by gamma_h, so that each of its logits
        q_nope . k_nope + q_rope . k_rope is gamma_h times what these weights give; the rope key k_rope is
        shared by all heads and left alone. Loads and S_max are reduced over the ranks first (SUM, MAX), so
        every replica applies the same update; under FSDP each rank updates its rows."""
        if self.moe_layers:
            if dist.is_initialized():
                dist.all_reduce(self.step_load)  # SUM: the load of the whole global batch
            with torch.no_grad():
                for moe, load in zip(self.moe_layers, self.step_load, strict=True):
                    bias = moe.router.bias
                    update = self.gamma * torch.sign(load.mean() - load)  # (n_experts,)
                    local = bias.to_local() if isinstance(bias, DTensor) else bias
                    local += local_part(update, bias).to(local.dtype)
            self.load += self.step_load
            self.step_load.zero_()

        def clip_heads(attn, gamma):
            """Scale MLA's per-head query and key rows by gamma (n_head,): the query projection's (wq, or wq_b
            after the low-rank query) rows [q_nope; q_rope] of each head by [sqrt(gamma); gamma], wkv_b's rows
            [k_nope; v] by [sqrt(gamma); 1] (values are not in the logits)."""
            root = gamma.sqrt()[:, None]  # (n_head, 1)
            q_rows = torch.cat([root.expand(-1, attn.nope_dim), gamma[:, None].expand(-1, attn.rope_dim)], dim=1)
            kv_rows = torch.cat([root.expand(-1, attn.nope_dim), torch.ones_like(root).expand(-1, attn.v_dim)], dim=1)
            query = attn.wq if attn.q_direct else attn.wq_b
            for linear, rows in ((query, q_rows), (attn.wkv_b, kv_rows)):
                w = linear.weight
                local = w.to_local() if isinstance(w, DTensor) else w
                local.mul_(local_part(rows.flatten(), w)[:, None].to(local.dtype))  # (out rows, 1)

        if dist.is_initialized():
            dist.all_reduce(self.step_logit_max, op=dist.ReduceOp.MAX)
        over = self.step_logit_max > self.tau  # (n_layer, n_head); False for -inf (nothing reported)
        gammas = torch.where(over, self.tau / self.step_logit_max, 1.0)
        with torch.no_grad():
            for attn, gamma, clipped in zip(self.attentions, gammas, over.tolist(), strict=True):
                if any(clipped):  # gamma 1 everywhere would leave the weights as they are
                    clip_heads(attn, gamma)
        self.logit_max = torch.maximum(self.logit_max, self.step_logit_max.max())
        self.step_logit_max.fill_(-math.inf)

    def summary(self):
        """Mean balance and MTP losses over all ranks, max/mean tokens per expert in the most unbalanced
        MoE layer (1.0 is even), and the largest pre-softmax attention logit of any head (before QK-Clip),
        since the last summary."""
        figures = {
            name: all_mean(self.sums[name] / self.counts[name]).item() for name in self.figures if self.counts[name]
        }
        if self.moe_layers:  # self.load is already summed over the ranks
            imbalance = self.load.max(dim=-1).values / self.load.mean(dim=-1).clamp(min=1e-9)
            figures["expert_load_max_over_mean"] = imbalance.max().item()
            self.load.zero_()
        if math.isfinite(self.logit_max.item()):  # already the max over the ranks
            figures["max_attention_logit"] = self.logit_max.item()
            self.logit_max.fill_(-math.inf)
        for name in self.figures:
            self.sums[name].zero_()
            self.counts[name] = 0
        return figures


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def make_optimizer(model, args, device):
    """MuonClip's optimizer (K2 report sec. 2.1 and Algorithm 1; Moonlight, Liu et al. 2025, sec. 2): Muon for
    every hidden weight matrix — attention projections, dense and shared MLPs, and each routed expert's
    matrices, orthogonalised one expert at a time — and AdamW for the rest: the embedding, the output head,
    norm gains and router weights. The routers' biases take no gradient (TrainingExtras.after_step moves them):
    left out of both. One optimizer object with both kinds of group, so the loop's schedule (each group's
    "lr"), clipping and checkpoints treat it as they treat AdamW; Muon's RMS matching lets both share --lr
    and --weight-decay, as K2 does. QK-Clip, the other half of MuonClip, is in TrainingExtras.after_step."""

    class MuonWithAdamW(torch.optim.Optimizer):
        """Groups with "muon": True take Muon's update (torch.optim.Muon's with adjust_lr_fn="match_rms_adamw",
        extended to (experts, out, in) stacks and FSDP shards); the others torch's AdamW, through its
        functional form. Nesterov momentum M <- mu M + (1 - mu) G, orthogonalised O = NS5(G + mu (M - G)),
        W <- W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) O: an update whose RMS is about AdamW's, 0.2 (Moonlight
        eq. 4), for any A x B matrix."""

        def __init__(self, groups, lr, betas, eps, momentum, ns_steps, ns_coefficients, ns_dtype):
            muon = dict(momentum=momentum, ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_eps=1e-7)
            super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, muon=False, **muon))
            self.ns_dtype = ns_dtype  # not a group setting: checkpoints need not know how NS ran

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                with_grad = [p for p in group["params"] if p.grad is not None]
                if with_grad:
                    (self.muon_step if group["muon"] else self.adamw_step)(group, with_grad)

        def muon_step(self, group, params):
            mu, lr, decay = group["momentum"], group["lr"], group["weight_decay"]
            for p in params:
                momentum = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                momentum.lerp_(p.grad, 1 - mu)
                nesterov = p.grad.lerp(momentum, mu)
                update = self.orthogonalised_part(nesterov, group)  # this process's rows of O
                A, B = p.shape[-2:]  # one matrix's (out, in), for an expert stack too
                local = p.to_local() if isinstance(p, DTensor) else p
                local.mul_(1 - lr * decay)  # decoupled weight decay, as AdamW's (Moonlight eq. 3)
                local.add_(update.to(local.dtype), alpha=-lr * 0.2 * math.sqrt(max(A, B)))

        def orthogonalised_part(self, update, group):
            """NS5 of each whole matrix of `update`, returned as the part this process holds. FSDP shards by
            rows (dim 0): an expert stack's shard holds whole experts, orthogonalised where they are; a 2-D
            matrix is gathered whole (every process runs the same iteration on it) and cut back to its rows."""
            steps, coefficients = group["ns_steps"], group["ns_coefficients"]
            if not isinstance(update, DTensor):
                return self.newton_schulz(update, steps, coefficients, group["ns_eps"])
            if update.dim() == 3 and all(p.is_shard(0) for p in update.placements):
                return self.newton_schulz(update.to_local(), steps, coefficients, group["ns_eps"])
            whole = self.newton_schulz(update.full_tensor(), steps, coefficients, group["ns_eps"])
            return local_part(whole, update)

        def newton_schulz(self, G, steps, coefficients, eps):
            """The quintic Newton-Schulz iteration of torch.optim.Muon (Jordan et al. 2024), applied to the
            last two dims: X <- a X + (b X X^T + c (X X^T)^2) X, from X = G / ||G||_F, drives every singular
            value of G towards 1 (near U V^T of G's SVD) in a few matrix products."""
            a, b, c = coefficients
            X = G.to(self.ns_dtype, copy=True)
            tall = G.size(-2) > G.size(-1)
            if tall:  # iterate on the wide orientation: X X^T is then the smaller square
                X = X.mT
            # the Frobenius norm bounds the spectral norm: every singular value starts in [0, 1]
            norm = X.norm() if X.dim() == 2 else X.norm(dim=(-2, -1), keepdim=True)  # per expert
            X.div_(norm.clamp(min=eps))
            matmul_add = torch.addmm if X.dim() == 2 else torch.baddbmm  # beta * input + alpha * (m1 @ m2)
            for _ in range(steps):
                gram = X @ X.mT
                polynomial = matmul_add(gram, gram, gram, beta=b, alpha=c)
                X = matmul_add(X, polynomial, X, beta=a)
            return X.mT if tall else X

        def adamw_step(self, group, params):
            from torch.optim.adamw import adamw

            state = [self.state[p] for p in params]
            for p, s in zip(params, state, strict=True):
                if not s:  # torch.optim.AdamW's state layout, so its checkpoints read the same
                    s.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            adamw(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in state],
                [s["exp_avg_sq"] for s in state],
                [],
                [s["step"] for s in state],
                amsgrad=False,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )

    def is_hidden_matrix(name, p):
        # router weights score experts (Moonlight and K2 keep them on AdamW); tok_emb and lm_head are the
        # vocabulary's tables, not maps between hidden spaces
        return p.dim() in (2, 3) and not name.startswith(("tok_emb.", "lm_head.")) and "router" not in name

    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon = [p for name, p in trained if is_hidden_matrix(name, p)]
    adamw = [p for name, p in trained if not is_hidden_matrix(name, p)]
    groups = [
        {"params": muon, "weight_decay": args.weight_decay, "muon": True},
        {"params": [p for p in adamw if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in adamw if p.dim() < 2], "weight_decay": 0.0},
    ]
    return MuonWithAdamW(
        groups,
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=1e-8,
        momentum=0.95,  # Muon's, as Moonlight and K2 train with
        ns_steps=5,
        ns_coefficients=(3.4445, -4.7750, 2.0315),  # torch.optim.Muon's (Keller Jordan's)
        # bf16 where it is fast (torch.optim.Muon's choice on GPU); fp32 on CPU, where bf16 matmuls are slower
        ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )


def lr_at(step, args):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    min_lr, last = args.lr * args.min_lr_ratio, args.max_steps - 1  # the last step runs at min_lr
    if args.schedule == "cosine":
        progress = (step - args.warmup_steps) / max(1, last - args.warmup_steps)
        return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = int(args.max_steps * (1 - args.decay_frac))  # wsd: stable, then linear decay
    if step < decay_start:
        return args.lr
    return args.lr + (min_lr - args.lr) * min(1.0, (step - decay_start) / max(1, last - decay_start))


# -----------------------------------------------------------------------------
# Checkpointing: atomic; FSDP through torch.distributed.checkpoint so it can reshard on resume.
# A checkpoint is written only once a forward pass has shown its weights give a finite loss (the
# loop defers each save by one step); a kill at any moment leaves one complete checkpoint.

CHECKPOINT_NAMES = ("ckpt.pt", "ckpt_dcp")  # one file without FSDP, a directory with it

# What the resumed run must share with the checkpoint, besides the model Config: a change here
# would train a different model, token stream or precision, so --resume refuses it.
RUN_SETTINGS = ("batch_size", "seq_len", "total_batch_tokens", "dtype")
# What --resume may change, each change logged: e.g. a lower --lr after a divergence, or a larger
# --max-steps to extend a run (the schedule is then recomputed from the new length).
SCHEDULE_SETTINGS = (
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "schedule",
    "decay_frac",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "max_steps",
)


def checkpoint_path(args):
    return Path(args.out_dir) / CHECKPOINT_NAMES[args.parallel == "fsdp"]


def find_checkpoint(path):
    """The checkpoint at `path`; or, where a directory swap was killed between its two renames, the
    complete previous one it left at path.old; or None."""
    if path.exists():
        return path
    old = path.with_name(path.name + ".old")
    return old if (old / "meta.pt").exists() else None


def temp_path(path):
    """A fresh name beside `path`, so two processes writing there never share a temp file."""
    return path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")


def write_file(path, obj):
    """torch.save to a temp file, fsync, rename over `path`: a crash leaves the old file or the new."""
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def replace_dir(new, path):
    """Swap the complete directory `new` in for `path`. Each step leaves a complete checkpoint that
    find_checkpoint returns: `path` throughout, except between the two renames, when it is path.old."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():  # an earlier swap was killed before removing it; `path` is newer
            shutil.rmtree(old)
        os.replace(path, old)
    # else: an earlier swap was killed between its renames; path.old holds the previous checkpoint
    os.replace(new, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path, model, optimizer, meta, args, rank):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    if args.parallel == "fsdp":
        import torch.distributed.checkpoint as dcp

        names = [temp_path(path)]
        dist.broadcast_object_list(names, src=0)  # every rank writes its shards into rank 0's temp directory
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=names[0])
        dist.barrier()
        if rank == 0:
            write_file(names[0] / "meta.pt", meta)  # written last: marks the directory complete
            replace_dir(names[0], path)
        dist.barrier()
    elif rank == 0:
        write_file(path, {"model": model_state, "optim": optim_state, "meta": meta})


def read_meta(path):
    """Step, RNG, loader state and the settings a checkpoint was trained with, without its tensors."""
    if path.is_dir():
        return torch.load(path / "meta.pt", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]


def load_checkpoint(path, model, optimizer, args):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if args.parallel == "fsdp":
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)  # in place, resharded to this world size
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no pickle code execution
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def run_settings(args, total_batch, compute_dtype):
    """The arguments stored with a checkpoint (RUN_SETTINGS and SCHEDULE_SETTINGS), as resolved."""
    settings = {name: getattr(args, name) for name in SCHEDULE_SETTINGS}
    return settings | {
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "total_batch_tokens": total_batch,
        "dtype": str(compute_dtype).removeprefix("torch."),
    }


def differences(old, new, names):
    """["n_head 4 -> 2", ...] for the names whose stored value (absent in older checkpoints: skipped) differs."""
    return [f"{name} {old[name]} -> {new[name]}" for name in names if name in old and old[name] != new[name]]


def check_resumable(meta, path, cfg, settings, args, log):
    """Refuse in one line a checkpoint of another model or run; log the schedule changes a resume may make."""
    config = dataclasses.asdict(cfg)
    if args.generate:  # sampling needs only the same architecture
        changed = differences(meta.get("config", {}), config, config)
        if changed:
            raise SystemExit(
                f"--generate: {path} holds a model with another Config: {', '.join(changed)}; "
                "pass the --preset and --set it was trained with"
            )
        return
    stored = meta.get("settings", {})
    changed = differences(meta.get("config", {}), config, config) + differences(stored, settings, RUN_SETTINGS)
    if changed:
        raise SystemExit(
            f"--resume: {path} was trained with other settings: {', '.join(changed)}; pass the same "
            "values, or start a new run in another --out-dir"
        )
    changed = differences(stored, settings, SCHEDULE_SETTINGS)
    if changed:
        log(f"resuming with changed settings: {', '.join(changed)}")


def truncate_metrics(path, step):
    """Keep the rows up to `step`: those a run wrote after its last checkpoint are about to be redone."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                rows.append(line + "\n")
        except json.JSONDecodeError:  # a row cut short by a kill
            pass
    tmp = temp_path(path)
    tmp.write_text("".join(rows))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Training loop


def evaluate(wrapped, loader, args, device, autocast, rank, world_size):
    """Mean loss over the first eval_steps validation batches: the same tokens for any number of
    processes. Every rank reads the whole stream (the loader is not strided) and evaluates batches
    rank, rank + world_size, ...; the sums meet in an all-reduce."""
    wrapped.eval()
    loader.reset()  # the same validation batches every time, so evaluations compare
    total = torch.zeros((), device=device)
    with torch.no_grad(), autocast:
        for i in range(math.ceil(args.eval_steps / world_size) * world_size):
            x, y = loader.next_batch()
            if i % world_size == rank:
                loss = wrapped(x.to(device), y.to(device))[1].float()
                if i < args.eval_steps:  # past it, the forward only keeps FSDP's collectives in step
                    total += loss
    wrapped.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.item() / args.eval_steps


# dense bf16 tensor-core peaks in TFLOP/s (SXM parts), matched against torch.cuda.get_device_name;
# bench/mfu.py reads this table too
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "4090": 165.0}


def peak_flops(args, device, compute_dtype):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type == "cuda" and compute_dtype == torch.bfloat16:  # fp32/tf32 peaks differ
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def main(argv=None):
    """Train, or sample with --generate. A user's mistake ends the run with one line (SystemExit);
    anything else keeps its traceback."""
    try:
        return train(parse_args(argv))
    except DataError as e:  # a shard or data directory that cannot be used; the message names it
        raise SystemExit(str(e)) from None


def train(args):
    rank, world_size, device = setup_distributed(args)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    compute_dtype = (
        torch.bfloat16
        if args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
        else torch.float32
    )
    # FSDP casts through its mixed-precision policy; elsewhere autocast does
    use_autocast = compute_dtype != torch.float32 and args.parallel != "fsdp"
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=use_autocast)

    cfg = config_from_args(args)
    if args.seq_len > cfg.block_size:
        raise SystemExit(f"--seq-len {args.seq_len} is longer than the model's block_size {cfg.block_size}")
    tokens_per_micro = args.batch_size * args.seq_len * world_size
    total_batch = args.total_batch_tokens or tokens_per_micro
    if total_batch % tokens_per_micro:
        raise SystemExit(
            f"--total-batch-tokens {total_batch} is not a multiple of batch-size x seq-len x "
            f"processes = {tokens_per_micro}"
        )
    accum = total_batch // tokens_per_micro
    settings = run_settings(args, total_batch, compute_dtype)

    # a run in --out-dir is continued (--resume) or sampled from (--generate), never replaced
    out_dir, ckpt = Path(args.out_dir), checkpoint_path(args)
    existing = [path for name in CHECKPOINT_NAMES if (path := find_checkpoint(out_dir / name))]
    found, meta = find_checkpoint(ckpt), None
    if args.resume or (args.generate and not args.init_from):
        if found is None:
            hint = (
                f" ({existing[0]} was written {'with' if existing[0].is_dir() else 'without'} --parallel fsdp)"
                if existing
                else ""
            )
            raise SystemExit(f"no checkpoint at {ckpt} to {'resume' if args.resume else 'sample'} from{hint}")
        meta = read_meta(found)
        check_resumable(meta, found, cfg, settings, args, log)
    elif existing and not args.generate:
        raise SystemExit(
            f"{out_dir} already holds a run ({existing[0]}): continue it with --resume, or pass another --out-dir"
        )

    with torch.device("meta"):  # shapes only: the plan is checked before anything is allocated
        plan = memory_plan(Transformer(cfg), args, world_size, compute_dtype)
    capacity = device_memory(device)
    if not args.generate:  # sampling holds the weights only, not this plan's training state
        check_memory(plan, capacity, args, world_size, device)
    model, wrapped = build_model(args, cfg, device, compute_dtype)
    optimizer = make_optimizer(model, args, device)
    extras = TrainingExtras(model, args, device)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (ValueError, OSError) as e:
        raise SystemExit(f"--tokenizer: {e}") from None
    if args.generate or args.sample_tokens:  # checked now, not after the training
        prompt = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
        if max(prompt) >= cfg.vocab_size:
            raise SystemExit(
                f"--prompt {args.prompt!r} has token id {max(prompt)}, outside the model's "
                f"vocabulary of {cfg.vocab_size}: pass the --tokenizer it was trained with"
            )

    step = 0
    if meta:
        load_checkpoint(found, model, optimizer, args)
        step = meta["step"]
        torch.set_rng_state(meta["rng"]["cpu"])
        if "cuda" in meta["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(meta["rng"]["cuda"], device)
        log(f"loaded {found} at step {step}")
    if args.generate:
        print_sample(model, tokenizer, args, device, autocast, log)
        return []

    # data: every process reads its own stride of the same training stream
    data_dir = args.data_dir
    if data_dir is None:  # rank 0 tokenizes the bundled corpus once; the others wait for it
        if not is_main:
            dist.barrier()
        data_dir = default_corpus()
        if is_main and dist.is_initialized():
            dist.barrier()
    # prepare.json's tokenizer: not one with more ids than the model, nor (--init-from) another than the checkpoint's
    log(check_tokenizer(data_dir, cfg.vocab_size, args.init_from))
    # vocab_size: a shard holding an id the model cannot embed fails when opened, naming the shard;
    # validation reads the whole stream on every rank (see evaluate)
    train_loader = DataLoader(data_dir, "train", args.batch_size, args.seq_len, rank, world_size, cfg.vocab_size)
    val_loader = DataLoader(data_dir, "val", args.batch_size, args.seq_len, vocab_size=cfg.vocab_size)
    if meta:
        train_loader.load_state_dict(meta["loader"])
    flops_per_step = model.flops_per_token(args.seq_len) * total_batch
    peak = peak_flops(args, device, compute_dtype)
    log(
        f"{model.num_params():,} parameters{extras.describe()} | {world_size} process(es), {args.parallel} | "
        f"{device} {compute_dtype} | {total_batch:,} tokens per step = {accum} micro-batch(es) of "
        f"{args.batch_size}x{args.seq_len} per process"
    )
    log(describe_memory(plan, capacity, device))
    if args.recipe:
        given = ", ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in args.recipe.items())
        log(f"from the {args.preset} preset's published recipe (TRAINING_DEFAULTS): {given}")

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, metrics = out_dir / "metrics.jsonl", None
    if is_main:
        if meta:  # rows past the checkpoint are about to be redone; temp files of killed writes go
            truncate_metrics(metrics_path, step)
            for leftover in [p for name in CHECKPOINT_NAMES for p in out_dir.glob(f"{name}.*.tmp")]:
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        elif metrics_path.exists():
            log(f"replacing {metrics_path}: the run that wrote it left no checkpoint")
        metrics = open(metrics_path, "a" if meta else "w")  # noqa: SIM115 (closed at the end)
    history = []

    def record(**row):
        history.append(row)
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    saved = (found, step) if meta else None  # the checkpoint a stop names: (path, step)

    def snapshot():  # the small part of a checkpoint, taken as its step ends
        return {
            "step": step,
            "rng": rng_state(device),
            "loader": train_loader.state_dict(),
            "config": dataclasses.asdict(cfg),
            "settings": settings,
        }

    def checkpoint_now(meta):
        nonlocal saved
        save_checkpoint(ckpt, model, optimizer, meta, args, rank)
        saved = (ckpt, meta["step"])
        log(f"saved checkpoint {ckpt} at step {meta['step']}")

    def stop(problem):
        good = f"the last good checkpoint is {saved[0]} (step {saved[1]})" if saved else "no checkpoint was written"
        raise SystemExit(f"{problem}: stopping without updating; {good}")

    # A checkpoint due after step N is written during step N + 1, once its forward has given a
    # finite loss: the weights and optimizer are still step N's then, as the update has not run.
    pending = None  # that step's snapshot, waiting
    last_step = min(args.max_steps, step + args.stop_after) if args.stop_after else args.max_steps
    t0, last_logged = time.perf_counter(), step
    while step < last_step:
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = train_loader.next_batch()
            set_gradient_sync(wrapped, args, enabled=micro == accum - 1)
            aux = {}  # the forward's own statistics, e.g. a mixture of experts' load
            with autocast:
                _, loss = wrapped(x.to(device, non_blocking=True), y.to(device, non_blocking=True), aux=aux)
            (loss / accum).backward()  # accumulated gradients = gradient of the mean loss
            loss_sum += loss.detach()
            extras.after_forward(aux)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
        train_loss = all_mean(loss_sum / accum).item()
        if not math.isfinite(train_loss):
            stop(f"loss is {train_loss} at step {step}")
        if pending:
            checkpoint_now(pending)
            pending = None
        if not math.isfinite(grad_norm.item()):
            stop(f"gradient norm is {grad_norm.item()} at step {step} (loss {train_loss:.4f})")
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        extras.after_step(model)
        step += 1

        figures = {}
        if step % args.log_every == 0 or step == args.max_steps:
            tokens_per_s = total_batch * (step - last_logged) / (time.perf_counter() - t0)
            mfu = flops_per_step / total_batch * tokens_per_s / peak if peak else None
            figures = extras.summary()
            log(
                f"step {step:5d} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | "
                f"{tokens_per_s:,.0f} tok/s"
                + (f" | MFU {100 * mfu:.1f}%" if mfu else "")
                + "".join(f" | {name} {value:.4g}" for name, value in figures.items())
            )
            t0, last_logged = time.perf_counter(), step
        record(step=step, loss=train_loss, lr=lr, **figures)
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            val_loss = evaluate(wrapped, val_loader, args, device, autocast, rank, world_size)
            log(f"step {step:5d} | val loss {val_loss:.4f}")
            record(step=step, val_loss=val_loss)
        if (args.ckpt_every and step % args.ckpt_every == 0) or step == last_step:
            pending = snapshot()
    if pending:  # the run's last weights: one forward on the next batch, without an update, proves them
        with torch.no_grad(), autocast:
            x, y = train_loader.next_batch()
            loss = all_mean(wrapped(x.to(device), y.to(device))[1].float()).item()
        if not math.isfinite(loss):
            stop(f"loss is {loss} at step {step}")
        checkpoint_now(pending)

    if args.sample_tokens:
        print_sample(model, tokenizer, args, device, autocast, log)
    if metrics:
        metrics.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return history


# -----------------------------------------------------------------------------
# Sample


def print_sample(model, tokenizer, args, device, autocast, log):
    # every process samples (FSDP needs all ranks in each forward); the same seed on every
    # rank gives the same text, which rank 0 prints
    prompt = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    idx = torch.tensor([prompt], device=device)
    n = min(args.sample_tokens, model.cfg.block_size - idx.size(1))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    model.eval()
    with autocast:
        out = model.generate(idx, n, temperature=args.temperature, top_k=args.top_k, generator=generator)
    log("-" * 80 + "\n" + tokenizer.decode(out[0].tolist()) + "\n" + "-" * 80)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:  # a user error's one line: under torchrun, rank 0 alone prints it
        if isinstance(e.code, str) and int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(1) from None
        raise
