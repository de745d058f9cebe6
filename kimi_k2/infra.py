"""Kimi K2's training machinery, which train.py reaches by a few calls: the Config from --preset/--set or
--init-from, the model built and wrapped (meta device, activation checkpointing, compile,
FSDP2, sharded --init-from), the memory plan checked before anything is allocated, the data loaders,
and the run directory (atomic checkpoints, resume, metrics.jsonl).

Every model's folder has its own infra.py: identical to its siblings' where the models agree
(tests/test_copies.py's INFRA_COPIES), different exactly where they differ. Kimi K2 is
DeepSeek-V3's architecture, so this is deepseek3/infra.py (its changes from qwen3's marked `# diff vs
qwen3`) with MuonClip's memory, marked `# diff vs deepseek3`: Muon keeps one momentum buffer per matrix it
updates where AdamW keeps two moments, and under FSDP it gathers each 2-D matrix whole in the step.
"""

import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import typing
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from kimi_k2 import hf
from kimi_k2.model import LOSS_CHUNK_ELEMENTS, Config, Transformer, loss_chunk_rows
from shared.data import MARKER, DataLoader, check_tokenizer, default_corpus, fsync_dir, hold_dir, unigram_entropy
from shared.plot import write_loss_plot
from shared.tokenizer import TIKTOKEN_FILES, load_tokenizer

# -----------------------------------------------------------------------------
# The Config: a preset with --set's overrides, or --init-from's config.json


def config_from_args(args):
    """The model's Config: --init-from's config.json, or the preset with --set's overrides."""
    if args.init_from:
        return pretrained_config(args.init_from)
    try:
        return Config.from_preset(args.preset, **parse_overrides(args.set))
    except ValueError as e:  # a bad --set or a Config check: one line, no traceback
        raise SystemExit(str(e)) from None


def pretrained_config(path):
    """The Config in a Hugging Face directory's config.json, or one line saying why there is none: what
    hf.check_checkpoint_dir refuses (a hub name not yet downloaded gets the download command; another
    architecture's checkpoint, the package that reads it), as Transformer.from_pretrained does."""
    try:
        hf.check_checkpoint_dir(path)
        return hf.read_config(path)
    except hf.CheckpointError as e:
        raise SystemExit(f"--init-from {e}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SystemExit(f"--init-from {path}: config.json is not a config we can read ({e!r})") from None


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
# The model, built on the meta device and wrapped, as torchtitan does


# diff vs qwen3: the multi-token-prediction modules are checkpointed and compiled as blocks are
def build_model(args, cfg, device, compute_dtype):
    """Built on the meta device (shapes, no storage), wrapped, then allocated: activation checkpointing
    -> compile (the whole forward; each block under FSDP) -> FSDP2 groups -> to_empty -> the initial
    values (or --init-from's weights). Under FSDP each process only ever allocates its shard. Returns
    (the plain module, for state dicts and generation; what the loop calls: the module or its DDP
    wrapper)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for block in [*model.layers, *model.mtp]:  # an MTP module, a block with its projections, as one
        if args.activation_checkpointing:  # keeps parameter names unchanged, unlike a wrapper module
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if args.compile and args.parallel == "fsdp":  # FSDP2's hooks run between blocks: each compiled, as torchtitan
            block.compile()
    if args.compile and args.parallel != "fsdp":  # the whole forward, embedding to loss, one graph (a break: an error)
        model.compile(fullgraph=True)  # in place: no `_orig_mod.` in the parameter names
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
    return model, model


# diff vs qwen3: MTP modules and biased routers (in fp32) are groups of their own
def shard_model(model, compute_dtype):
    """FSDP2 groups, each gathered just before its forward and freed after: the embedding, each block,
    each multi-token-prediction module (model.mtp), each router with a bias (in fp32), the final norm
    with the head, and a root for what is left. A tied head shares the embedding's matrix, and so its group."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # params stored in fp32 and gathered in the compute dtype; gradients reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    head = [model.norm, model.lm_head]
    fully_shard([model.tok_emb, *head] if model.cfg.tie_embeddings else model.tok_emb, mp_policy=mp)
    for router in biased_routers(model):  # inner groups first: each then leaves its block's group
        fully_shard(router, mp_policy=dataclasses.replace(mp, param_dtype=torch.float32, cast_forward_inputs=False))
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    for module in model.mtp:  # a block of its own and its projections, run after the main blocks
        fully_shard(module, mp_policy=mp)
    if not model.cfg.tie_embeddings:
        fully_shard(head, mp_policy=mp)
    # the root's inputs are token ids, nothing to cast; and casting would pass the forward a copy of the loop's
    # aux dict (FSDP rebuilds every dict it casts), leaving the loop's own empty: no expert load, no bias update
    fully_shard(model, mp_policy=dataclasses.replace(mp, cast_forward_inputs=False))


# diff vs qwen3: DeepSeek-V3's routers carry a selection bias, gathered in fp32
def biased_routers(model):
    """The MoE routers with a selection bias (DeepSeek-V3 report sec. 2.1.2), which FSDP gathers in fp32,
    each its own group: the bias moves by gamma = 0.001 a step, below bf16's spacing of 0.004 near 1, so a
    bf16 copy would route by a bias that lags its updates. The router computes in fp32 anyway."""
    return [m.router for m in model.modules() if getattr(getattr(m, "router", None), "bias", None) is not None]


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
    """--init-from: the checkpoint read one layer at a time in our names (hf.read_layers_as_ours), each
    FSDP process reading only its rows of each tensor the conversion just renames: peak memory is the
    shard plus at most one transformed layer."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    found = {}
    for part in hf.read_layers_as_ours(path, model.cfg, functools.partial(rows_kept, model)):
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


def all_mean(x: torch.Tensor):
    """x averaged over the processes, in place (x itself without torch.distributed)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.device.type == "cuda" else dist.ReduceOp.SUM)
        if x.device.type != "cuda":  # gloo has no AVG
            x /= dist.get_world_size()
    return x


# -----------------------------------------------------------------------------
# Memory plan: what each process will hold, estimated from the meta model before anything is allocated


def plan_memory(args, cfg, world_size, device, compute_dtype):
    """The start-up log's memory line; refuses first, before anything is allocated, a training run
    whose estimate exceeds the device's memory (sampling holds the weights only, not this plan)."""
    with torch.device("meta"):  # shapes only
        plan = memory_plan(Transformer(cfg), args, world_size, compute_dtype)
    capacity = device_memory(device)
    if not args.generate:
        check_memory(plan, capacity, args, world_size, device)
    return describe_memory(plan, capacity, device)


# diff vs deepseek3: MuonClip's optimizer state (optimizer_bytes)
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
        # make_optimizer's state, counted rather than built, since it is only created at the first step
        "optimizer": optimizer_bytes(model, shards),
        "transient": transient_bytes(model, args, compute_dtype),
        "activations": activation_bytes(model, args, compute_dtype),
    }


# diff vs deepseek3: Muon's one buffer
def optimizer_bytes(model, shards):
    """make_optimizer's state on the process holding the most: Muon's fp32 momentum (Jordan et al. 2024) for
    each matrix it updates, AdamW's two fp32 moments (Loshchilov & Hutter 2019, alg. 2) for each other
    trained parameter, none for the routers' biases, which take no gradient. AdamW's step counts, one
    scalar per tensor, are left out. Under FSDP Muon gathers each 2-D matrix whole in the step (its fp32
    update and two bf16 Newton-Schulz iterates: 8 bytes an element), which transient_bytes already covers:
    backward has freed the gathered groups by then, and the largest holds that matrix at 8 bytes or more."""

    def moments(name, p):  # fp32 tensors of p's size
        if not p.requires_grad:
            return 0
        return 1 if is_hidden_matrix(name, p) else 2

    return sum(4 * moments(name, p) * local_numel(p, shards) for name, p in model.named_parameters())


# diff vs deepseek3: the parameters Muon updates, for make_optimizer and the memory plan alike
def is_hidden_matrix(name, param):
    """Whether Muon updates this parameter: every hidden weight matrix, each routed expert's stack too.
    Router weights score experts (Moonlight and K2 keep them on AdamW); tok_emb and lm_head are the
    vocabulary's tables, not maps between hidden spaces."""
    return param.dim() in (2, 3) and not name.startswith(("tok_emb.", "lm_head.")) and "router" not in name


def local_numel(param, shards):
    """Elements of param on the process holding the most of it: FSDP2 splits dim 0 into `shards`
    equal parts, the last ones padded."""
    if shards == 1 or param.dim() == 0:
        return param.numel()
    return math.ceil(param.size(0) / shards) * (param.numel() // param.size(0))


# diff vs qwen3: shard_model's MTP and router groups
def fsdp_groups(model):
    """Parameters in each FSDP2 group of shard_model: the embedding (with the head when tied), each
    block and each MTP module (less their biased routers), each biased router, the final norm with the
    head, and the root's rest."""
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    tied = model.cfg.tie_embeddings
    groups = [count(model.tok_emb, model.norm) if tied else count(model.tok_emb)]
    groups += [count(block) - count(*biased_routers(block)) for block in [*model.layers, *model.mtp]]
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


# diff vs qwen3: the MTP module's activations
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
    mtps = [mtp_bytes_per_token(module, cfg, size, stream) for module in model.mtp]
    largest = max(blocks + mtps)
    if args.activation_checkpointing:
        per_token = stream * cfg.n_embd * (len(blocks) + 2 * len(mtps)) + 2 * largest
    else:
        per_token = sum(blocks) + sum(mtps) + largest
    # final norm, the head's input in the compute dtype (and each MTP module's); the loss holds one fp32
    # chunk of logits and, in backward, its gradient in fp32 and in the compute dtype
    per_token += norm_bytes(model.norm, cfg.n_embd, stream) + size * cfg.n_embd * (1 + len(mtps))
    # as linear_cross_entropy: all the logits when they fit one chunk, else loss_chunk_rows rows at a time
    rows, vocab = tokens, model.lm_head.weight.size(0)  # the head's rows, padding included
    if tokens * vocab > LOSS_CHUNK_ELEMENTS:
        rows = min(tokens, loss_chunk_rows(vocab))
    return tokens * per_token + rows * vocab * (4 + 4 + size)


# diff vs qwen3: multi-token prediction
def mtp_bytes_per_token(module, cfg, size, stream):
    """Bytes one token leaves saved in a multi-token-prediction module (DeepSeek-V3 sec. 2.2, eq. 21-23):
    the two norms, eh_proj's input (both halves), a block and its final norm. Its loss goes through the
    shared head, whose chunk of logits the main loss's reuses, one at a time."""
    d = cfg.n_embd
    total = norm_bytes(module.enorm, d, stream) + norm_bytes(module.hnorm, d, stream) + size * 2 * d
    return total + block_bytes_per_token(module.block, cfg, size, stream) + norm_bytes(module.norm, d, stream)


def block_bytes_per_token(block, cfg, size, stream):
    """Bytes one token leaves saved for backward in a block: its two norms, attention and MLP. SDPA
    keeps no T x T matrix, so this is linear in T."""
    d = cfg.n_embd
    total = norm_bytes(block.attn_norm, d, stream) + norm_bytes(block.mlp_norm, d, stream)
    return total + attention_bytes_per_token(block.attn, cfg, size) + mlp_bytes_per_token(block.mlp, cfg, size)


# diff vs gpt2: RMSNorm, which normalises in fp32
def norm_bytes(norm, width, stream):
    """Per token saved by our RMSNorm: its input, in the residual stream's dtype, and an fp32 copy."""
    return stream * width + 4 * width


# diff vs qwen3: multi-head latent attention, without QK-Norm
def attention_bytes_per_token(attn, cfg, size):
    """Bytes one token leaves saved in MLA (DeepSeek-V2 sec. 2.1), in the expanded form training runs:
    the projections' input, the q and kv latents, SDPA's q, k, v and output, and wo's input."""
    q = cfg.n_head * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # q and k: per head, nope + rope dims
    v = cfg.n_head * cfg.v_head_dim
    # the q and kv latents: each RMSNorm keeps its input in fp32 and hands its up-projection its output
    latents = cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    # SDPA's v is a view of wkv_b's output, which holds every head's k_nope too: kept whole
    v_storage = cfg.n_head * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    # q, k, v, SDPA's output and its fp32 log-sum-exp per head, wo's input
    return size * (cfg.n_embd + 2 * q + v_storage + 2 * v) + 4 * cfg.n_head + (4 + 2 * size) * latents


# diff vs qwen3: DeepSeekMoE's shared experts
def mlp_bytes_per_token(mlp, cfg, size):
    """Bytes one token leaves saved in the SwiGLU MLP: its input, gate, up, SiLU(gate), their product.
    In an MoE layer: the input, each token's top-k rows gathered, each through an expert's SwiGLU
    (gate, up, SiLU(gate), product), the weighted outputs; the router's probabilities and the logits
    kept for the balancing loss, in fp32; and the shared experts, one SwiGLU over every token."""
    d = cfg.n_embd
    if hasattr(mlp, "router"):
        k, hidden = cfg.n_experts_per_tok, cfg.moe_intermediate_size
        routed = size * (d + k * (2 * d + 4 * hidden)) + 2 * 4 * cfg.n_experts
        return routed + size * 4 * hidden * cfg.n_shared_experts
    return size * (d + 4 * cfg.intermediate_size)


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
# Data: every process reads its own stride of the same training stream; the tokenizer


def data_loaders(args, cfg, rank, world_size, log):
    """(train, validation) loaders over --data-dir, or over the bundled corpus, which rank 0 tokenizes
    once while the others wait. Validation reads the whole stream on every rank (see evaluate)."""
    data_dir = args.data_dir
    if data_dir is None:
        if rank != 0:
            dist.barrier()
        data_dir = default_corpus()
        if rank == 0 and dist.is_initialized():
            dist.barrier()
    # prepare.json's tokenizer: not one with more ids than the model, nor (--init-from) another than the checkpoint's
    log(check_tokenizer(data_dir, cfg.vocab_size, args.init_from))
    # vocab_size: a shard holding an id the model cannot embed fails when opened, naming the shard
    train_loader = DataLoader(data_dir, "train", args.batch_size, args.seq_len, rank, world_size, cfg.vocab_size)
    val_loader = DataLoader(data_dir, "val", args.batch_size, args.seq_len, vocab_size=cfg.vocab_size)
    # the val loss of a model that knows only how common each token is: the loss to beat, logged beside it
    val_loader.unigram = unigram_entropy(data_dir, "val") if rank == 0 else None
    return train_loader, val_loader


class Prefetcher:
    """The training loader's batches on the device. On CUDA each is pinned and copied without blocking one
    batch ahead, so the next batch's copy overlaps this one's compute; elsewhere they come as they are.
    state_dict is the loader's before the batch fetched ahead: a checkpoint resumes with that batch."""

    def __init__(self, loader, device):
        self.loader, self.device, self.ahead = loader, device, None
        self.state = loader.state_dict()

    def next_batch(self):
        if self.device.type != "cuda":
            return self.loader.next_batch()
        batch = self.ahead or self.fetch()
        self.state = self.loader.state_dict()
        self.ahead = self.fetch()
        return batch

    def fetch(self):
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in self.loader.next_batch())

    def state_dict(self):
        return self.state if self.device.type == "cuda" else self.loader.state_dict()


def load_tokenizer_for(args, cfg):
    """--tokenizer, checked now rather than after the training: the prompt must be in the model's vocabulary."""
    args.tokenizer = args.tokenizer or default_tokenizer(args)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (ValueError, OSError) as e:
        raise SystemExit(f"--tokenizer: {e}") from None
    if args.generate or args.sample_tokens:
        prompt = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
        if max(prompt) >= cfg.vocab_size:
            raise SystemExit(
                f"--prompt {args.prompt!r} has token id {max(prompt)}, outside the model's "
                f"vocabulary of {cfg.vocab_size}: pass the --tokenizer it was trained with"
            )
    return tokenizer


def default_tokenizer(args):
    """--tokenizer's default: the tokenizer the --init-from checkpoint ships, else the one that made the
    data (its prepare.json; the bundled corpus: bytes), else GPT-2's."""
    if args.init_from and any((Path(args.init_from) / f).is_file() for f in ("tokenizer.json", *TIKTOKEN_FILES)):
        return args.init_from
    if args.data_dir is None:
        return "bytes"  # default_corpus's
    marker = Path(args.data_dir) / MARKER
    name = (json.loads(marker.read_text()).get("tokenizer") or {}).get("name") if marker.is_file() else None
    # a tokenizer.json is recorded as "tokenizer.json:PATH"; tiktoken files as "FORMAT:PATH", load_tokenizer's own
    return name.removeprefix("tokenizer.json:") if name else "gpt2"


# -----------------------------------------------------------------------------
# Each step's figures, read from the device only where the loop may wait


class StepFigures:
    """Each step's loss and gradient norm, kept on the device until a step that may wait for it (a log, eval
    or last step, or one about to write a checkpoint) reads all of them at once: one all-reduce of the
    losses and one copy to the host, so the other steps never make the host wait for the device. A read
    stops the run at the first non-finite value, naming its step, before any checkpoint can hold it."""

    def __init__(self, run):
        self.run, self.rows = run, []  # [step, lr, loss, grad norm]: tensors until read

    def add(self, step, lr, loss):
        self.rows.append([step, lr, loss, None])

    def add_grad_norm(self, grad_norm):
        self.rows[-1][3] = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP: a DTensor

    def read(self):
        """The rows not yet taken, as floats; stops the run at the first non-finite loss or gradient norm."""
        losses = [row for row in self.rows if isinstance(row[2], torch.Tensor)]
        norms = [row for row in self.rows if isinstance(row[3], torch.Tensor)]
        if losses or norms:  # the losses averaged over the processes; a gradient norm is the same on each already
            parts = [all_mean(torch.stack([row[2] for row in losses]))] if losses else []
            parts += [torch.stack([row[3] for row in norms]).float()] if norms else []
            values = iter(torch.cat(parts).tolist())  # the one copy to the host
            for i, rows in ((2, losses), (3, norms)):
                for row in rows:
                    row[i] = next(values)
        for step, _, loss, grad_norm in self.rows:
            if not math.isfinite(loss):
                self.run.stop(f"loss is {loss} at step {step}")
            if grad_norm is not None and not math.isfinite(grad_norm):
                self.run.stop(f"gradient norm is {grad_norm} at step {step} (loss {loss:.4f})")
        return self.rows

    def take(self):
        """Read, then forget, the rows: [(step, lr, loss, grad norm)] since the last take."""
        rows, self.rows = self.read(), []
        return rows


# -----------------------------------------------------------------------------
# Checkpoints: atomic; FSDP through torch.distributed.checkpoint so it can reshard on resume

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
        # an earlier swap was killed before removing it; `path` is newer (gone meanwhile: nothing to do)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    # else: an earlier swap was killed between its renames; path.old holds the previous checkpoint
    os.replace(new, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(out_dir):
    """Delete the temp files and directories that killed checkpoint writes left in out_dir."""
    for leftover in [p for name in CHECKPOINT_NAMES for p in out_dir.glob(f"{name}.*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


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


class Run:
    """The run in --out-dir: its checkpoint and its metrics.jsonl. A run there is continued (--resume)
    or sampled from (--generate), never replaced.

    A checkpoint is written only once a forward pass has shown its weights give a finite loss: the one
    due after step N (snapshot) is written during step N + 1, once that step's forward has given a
    finite loss and before its update (save_pending), so a kill at any moment leaves one complete
    checkpoint and a stop always names a good one."""

    def __init__(self, args, cfg, settings, rank, device, log):
        self.args, self.cfg, self.settings, self.rank, self.device, self.log = args, cfg, settings, rank, device, log
        self.out_dir, self.path = Path(args.out_dir), checkpoint_path(args)
        # one run per out-dir, taken before anything is read or written there; --generate too, unless
        # there is nothing there (sampling --init-from writes nothing)
        holds = rank == 0 and not (args.generate and not self.out_dir.exists())
        self.lock = hold_dir(self.out_dir) if holds else None
        self.plotting = True  # until a plot fails
        self.found, self.meta = self.previous()
        self.saved = (self.found, self.meta["step"]) if self.meta else None  # the checkpoint a stop names
        self.pending = None  # the snapshot of a step whose checkpoint is due
        self.history, self.metrics = [], None

    def previous(self):
        """(path, meta) of the checkpoint to continue or sample from, else (None, None); refuses in one
        line a missing or mismatched one, and a new run over an existing one."""
        args, out_dir = self.args, self.out_dir
        existing = [path for name in CHECKPOINT_NAMES if (path := find_checkpoint(out_dir / name))]
        found = find_checkpoint(self.path)
        if args.resume or (args.generate and not args.init_from):
            if found is None:
                hint = (
                    f" ({existing[0]} was written {'with' if existing[0].is_dir() else 'without'} --parallel fsdp)"
                    if existing
                    else ""
                )
                raise SystemExit(f"no checkpoint at {self.path} to {'resume' if args.resume else 'sample'} from{hint}")
            meta = read_meta(found)
            check_resumable(meta, found, self.cfg, self.settings, args, self.log)
            return found, meta
        if existing and not args.generate:
            raise SystemExit(
                f"{out_dir} already holds a run ({existing[0]}): continue it with --resume, or pass another --out-dir"
            )
        return None, None

    def restore(self, model, optimizer):
        """Load the checkpoint found into the model and optimizer, and its RNG state; returns its step
        (0 for a new run)."""
        if not self.meta:
            return 0
        load_checkpoint(self.found, model, optimizer, self.args)
        torch.set_rng_state(self.meta["rng"]["cpu"])
        if "cuda" in self.meta["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(self.meta["rng"]["cuda"], self.device)
        self.log(f"loaded {self.found} at step {self.meta['step']}")
        return self.meta["step"]

    def start(self, train_loader):
        """Continue the loader where the checkpoint left it and open metrics.jsonl: on resume, its rows past
        the checkpoint are about to be redone and go, as do the temp files of killed writes."""
        if self.meta:
            train_loader.load_state_dict(self.meta["loader"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank != 0:
            return
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.meta:
            truncate_metrics(metrics_path, self.meta["step"])
            remove_leftovers(self.out_dir)
        elif metrics_path.exists():
            self.log(f"replacing {metrics_path}: the run that wrote it left no checkpoint")
        self.metrics = open(metrics_path, "a" if self.meta else "w")  # noqa: SIM115 (closed by close())

    def record(self, **row):
        """One row of metrics.jsonl (and of the history main() returns): a train row gains the tokens
        trained on so far; an eval row redraws loss.png from the file (shared/plot.py says every field)."""
        if "loss" in row:
            row = {"step": row["step"], "tokens": row["step"] * self.settings["total_batch_tokens"]} | row
        self.history.append(row)
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            if "val_loss" in row and self.plotting:
                self.plot()

    def plot(self):
        """loss.png beside metrics.jsonl; a plot that fails is worth one warning, never the run."""
        try:
            write_loss_plot(self.out_dir)
        except Exception as e:
            self.plotting = False
            self.log(f"warning: {self.out_dir / 'loss.png'} not drawn ({type(e).__name__}: {e}); training goes on")

    def snapshot(self, step, train_loader):
        """Take the small part of step's checkpoint as the step ends; it is written by save_pending."""
        self.pending = {
            "step": step,
            "rng": rng_state(self.device),
            "loader": train_loader.state_dict(),
            "config": dataclasses.asdict(self.cfg),
            "settings": self.settings,
        }

    def save_pending(self, model, optimizer):
        """Write the checkpoint due, if any: call once a forward has given a finite loss, before the update."""
        if self.pending is None:
            return
        save_checkpoint(self.path, model, optimizer, self.pending, self.args, self.rank)
        self.saved = (self.path, self.pending["step"])
        self.log(f"saved checkpoint {self.path} at step {self.pending['step']}")
        self.pending = None

    def stop(self, problem):
        """End the run in one line, without updating, naming the last good checkpoint."""
        saved = self.saved
        good = f"the last good checkpoint is {saved[0]} (step {saved[1]})" if saved else "no checkpoint was written"
        raise SystemExit(f"{problem}: stopping without updating; {good}")

    def close(self):
        for file in (self.metrics, self.lock):
            if file:
                file.close()
