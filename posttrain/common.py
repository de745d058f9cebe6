"""The plumbing every post-training method (sft.py, dpo.py, grpo.py, ppo.py) shares, written once:
distributed set-up, loading the policy (a train.py checkpoint, a Hugging Face directory or a fresh small
model) with its tokenizer and wrapping it for DDP or FSDP, the frozen reference, the optimizer and its
schedule, generation with the KV cache, sequence log-probs, the held-out reward and the metrics a run
writes, and the checkpoint it saves. A method's file holds what is its own: the loss, its arguments and
its loop. The command line they share is posttrain/cli.py (torch-free, so a method checks its arguments
before importing this module); tasks and data are posttrain/tasks.py."""

import copy
import dataclasses
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from posttrain.cli import DEFAULT_MODEL, SPECS
from posttrain.tasks import check_lengths, collate, task_vocabulary
from shared.data import fsync_dir, hold_dir
from shared.models import MODELS
from shared.tokenizer import load_tokenizer

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


def start(args):
    """setup_distributed, the CPU threads and the global seed, and what every method's train() takes next: a log that prints on rank 0 only,
    and a --batch-size that splits evenly over the processes. Rank 0 takes --out-dir for this run before
    anything is written there (shared.data.hold_dir keeps the lock until the process ends)."""
    rank, world_size, device = setup_distributed(args)
    if device.type == "cpu":  # the tiny models run as fast on one thread, and sum in the same order on any machine
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the global RNG (e.g. a fresh layer's init), same on every run and rank
    if rank == 0:
        hold_dir(args.out_dir)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of the {world_size} processes")
    return rank, world_size, device, log


def all_sum(x: torch.Tensor):
    """x summed over the processes (x itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def all_max(n):
    """The largest of the processes' integers n."""
    if not dist.is_initialized():
        return n
    x = torch.tensor(n)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x)


def all_gather(x):
    """The processes' equal-sized x, concatenated in rank order (x itself in one process)."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def local_part(x, rank):
    """This process's rows of a tensor all_gather built."""
    n = x.size(0) // (dist.get_world_size() if dist.is_initialized() else 1)
    return x[rank * n : (rank + 1) * n]


def gather_rows(x):
    """The processes' equal-sized x (n, ...) -> the whole batch (world x n, ...) in global row order: row j
    of process r is the batch's row j x world + r, as the prompts were dealt."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)  # (n, world, ...) -> (n x world, ...)


# -----------------------------------------------------------------------------
# Policy: a train.py checkpoint, a Hugging Face directory, or a fresh small model; its tokenizer


def load_policy(args, tokenizer, examples, log):
    """read_policy, then a check that the held-out prompts leave room for --max-new-tokens in its context."""
    model, source = read_policy(args, tokenizer, log)
    check_lengths([tokenizer.encode(p) for p in examples.eval_prompts], args, model.cfg.block_size)
    return model, source


def read_policy(args, tokenizer, log):
    """The policy on the CPU, and a line saying where it came from. A train.py checkpoint holds its Config
    (meta["config"]) but not its architecture's name: --model names it. No --init-from: the model's
    train.py out dir if it holds a checkpoint, else a fresh model; 'none': a fresh model."""
    path = policy_path(args)
    spec = SPECS[args.model]
    if path is None:
        overrides = {"vocab_size": tokenizer.vocab_size, **parse_overrides(spec, args.set)}
        model = spec.build(seed=args.seed, **overrides)
        default = f"out/{spec.package}"
        why = "" if args.init_from else f" ({default} holds no checkpoint; `{WRITERS[default]}` writes one)"
        return check_vocabulary(model, args, tokenizer), f"a fresh {args.model}{why}"
    if args.set:
        log(f"--set ignored: the policy's Config comes from {path}")
    if path.is_dir() and (path / "config.json").is_file():
        try:
            model = spec.model.Transformer.from_pretrained(path)
        except spec.hf.CheckpointError as e:  # one line naming the path, e.g. another architecture's
            raise SystemExit(f"--init-from {e}; posttrain picks the loader with --model") from None
        except (KeyError, ValueError, TypeError) as e:
            raise SystemExit(f"--init-from {path}: not a {args.model} checkpoint we can read ({e})") from None
        return check_vocabulary(model, args, tokenizer), f"Hugging Face checkpoint {path}"
    if path.is_file() or (path / "ckpt.pt").is_file():
        model = load_checkpoint(spec, path if path.is_file() else path / "ckpt.pt")
        return check_vocabulary(model, args, tokenizer), f"checkpoint {path}"
    if (path / "ckpt_dcp").exists():
        raise SystemExit(
            f"--init-from {path}: holds an FSDP (ckpt_dcp) checkpoint, which this file does not read; "
            "pass its Hugging Face export, or a run without --parallel fsdp"
        )
    hint = f" (`{WRITERS[str(path)]}` writes it)" if str(path) in WRITERS else ""
    hub = spec.hf.hub_download_hint(args.init_from)
    if not hint and hub and not path.exists():
        raise SystemExit(f"--init-from {path}: not a local directory; {hub}")
    raise SystemExit(f"--init-from {path}: no ckpt.pt or config.json there{hint}")


def policy_path(args):
    """Where read_policy reads the policy, None for a fresh model; sets args.model if --model is not given."""
    args.model = args.model or recorded_model(args.init_from) or DEFAULT_MODEL
    path = Path(args.init_from or f"out/{SPECS[args.model].package}")
    fresh = args.init_from == "none" or (args.init_from is None and not (path / "ckpt.pt").is_file())
    return None if fresh else path


# who writes the default --init-from directories
WRITERS = {"out/sft": "python posttrain/sft.py", **{f"out/{m.package}": f"python {m.package}/train.py" for m in MODELS}}


def recorded_model(init_from):
    """The --model a post-training run's ckpt.pt records (train.py's do not record theirs), or None."""
    path = Path(init_from or "")
    path = path / "ckpt.pt" if path.is_dir() else path
    if not init_from or not path.is_file():
        return None
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]
    except Exception:  # not a checkpoint: load_policy says so in one line
        return None
    return meta.get("posttrain", {}).get("model")


def check_vocabulary(model, args, tokenizer):
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise SystemExit(
            f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} ids; the policy embeds only "
            f"{model.cfg.vocab_size}: pass the tokenizer it was trained with"
        )
    return model


def parse_overrides(spec, items):
    """--set FIELD=VALUE strings, each parsed as its Config field's type by the model's own train.py."""
    try:
        return spec.infra.parse_overrides(items)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def load_checkpoint(spec, path):
    """A ckpt.pt as train.py (without FSDP) and the post-training files write it: model, optim, meta."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickle code execution
    try:
        model = spec.model.Transformer(spec.model.Config(**state["meta"]["config"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise SystemExit(f"--init-from {path}: not a {spec.name} checkpoint (pass its --model): {first}") from None
    return model


def wrap_policy(model, args, device):
    """The module the update calls: the policy itself, DDP around it, or FSDP2 sharding it in place
    (each block its own group, then the root), as train.py wraps its model. Generation calls the
    policy directly: FSDP's hooks gather each block's weights as its forward needs them."""
    model.to(device)
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    return model


def frozen_reference(model, args, device):
    """A copy of the initial policy that never trains, for the KL term: sharded as the policy under FSDP."""
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    reference.to(device)
    if args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in reference.layers:
            fully_shard(block)
        fully_shard(reference)
    return reference


def open_tokenizer(args):
    """--tokenizer, or by default the one the policy was trained with (see default_tokenizer); args.tokenizer
    is set to the choice, so the checkpoint's settings record it."""
    args.tokenizer = args.tokenizer or default_tokenizer(args)
    if args.tokenizer == "task":
        if args.data:
            raise SystemExit("--tokenizer task: holds only the toy tasks' words; pass --data's tokenizer (or gpt2)")
        return task_vocabulary()
    try:
        return load_tokenizer(args.tokenizer)
    except (ValueError, OSError) as e:
        raise SystemExit(f"--tokenizer: {e}") from None


def default_tokenizer(args):
    """The tokenizer.json beside the --init-from checkpoint (the post-training files save theirs there; a Hugging
    Face directory ships one), else the task vocabulary for a fresh model on a toy task, else GPT-2's."""
    path = policy_path(args)
    if path is None:
        return "gpt2" if args.data else "task"
    folder = path.parent if path.is_file() else path
    return str(folder) if (folder / "tokenizer.json").is_file() else "gpt2"


# -----------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model, args, device):
    # decay matrices (embeddings, linear weights); not biases or norm gains. The two groups of
    # train.py's optimizer, so that its --generate (and a train.py resume) loads this state.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def lr_at(step, args):
    """Linear warmup over warmup_steps, then cosine decay to a tenth of --lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - 1 - args.warmup_steps)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model, optimizer, step, args):
    """Clip the gradients, set the step's learning rate, step and zero them -> (gradient norm, lr)."""
    grad_norm = clip_gradients(model, args)
    lr = lr_at(step, args)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def clip_gradients(model, args):
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    return (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: DTensor


# -----------------------------------------------------------------------------
# Generation: batched sampling with the KV cache


def sample_next(logits, temperature, top_k, generators):
    """logits (B, vocab) -> next ids (B,). Greedy when generators is None; otherwise row i draws from its
    own generator, so a sequence's sample does not depend on which rows share its batch (or rank)."""
    if generators is None or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # inverse-CDF sampling, one uniform draw per row: the first token whose cumulative probability exceeds
    # it (right=True skips tokens of probability 0). torch.multinomial per row is ~40x slower at 50K tokens.
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, vocab)
    u = torch.stack([torch.rand((), generator=g, device=logits.device) for g in generators])  # (B,)
    next_id = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return next_id.clamp(max=logits.size(-1) - 1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eot_id, temperature=0.0, top_k=None, seeds=None):
    """Complete each prompt (a list of ids) -> [completion ids], each ending at its first EOT (kept) or
    after max_new_tokens. seeds: one int per prompt for sampling, None for greedy.

    The models' forward takes no attention mask, so a batch of prompts of different lengths cannot be
    padded: prompts are grouped by length and each group decodes as one batch with its KV cache, every
    row at the same positions. A row that has emitted EOT keeps decoding EOT (masked out later); a
    group stops when all its rows have. Under torchrun every process runs the same forward calls
    (FSDP gathers weights collectively): the union of lengths, an empty group decoding a dummy row."""
    device = next(model.parameters()).device
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    lengths = set(by_length)
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(lengths))
        lengths = set().union(*map(set, everyone))
    completions = [None] * len(prompts)
    for length in sorted(lengths):
        rows = by_length.get(length, [])
        batch = torch.tensor([prompts[i] for i in rows] or [[eot_id] * length], device=device)  # (G, P)
        generators = None
        if seeds is not None and temperature > 0:
            generators = [torch.Generator(device).manual_seed(seeds[i]) for i in rows] or [torch.Generator(device)]
        new = decode_group(model, batch, max_new_tokens, eot_id, temperature, top_k, generators)  # (G, n)
        for i, tokens in zip(rows, new.tolist()):
            completions[i] = tokens[: tokens.index(eot_id) + 1] if eot_id in tokens else tokens
    return completions


def decode_group(model, batch, max_new_tokens, eot_id, temperature, top_k, generators):
    """batch (G, P) of equal-length prompts -> (G, n) new tokens, n <= max_new_tokens, EOT after a row's stop."""
    G, P = batch.shape
    cache = model.make_cache(G, P + max_new_tokens)
    logits = model(batch, cache=cache, pos=0)[0][:, -1]  # prefill: (G, vocab)
    done = torch.zeros(G, dtype=torch.bool, device=batch.device)
    out = []
    for step in range(max_new_tokens):
        next_id = sample_next(logits, temperature, top_k, generators).masked_fill(done, eot_id)  # (G,)
        out.append(next_id)
        done |= next_id == eot_id
        if step + 1 == max_new_tokens or everyone_done(done):
            break
        logits = model(next_id[:, None], cache=cache, pos=P + step)[0][:, -1]
    return torch.stack(out, dim=1)


def everyone_done(done):
    """Whether every row of every process's current group has stopped."""
    left = (~done).sum()
    return all_sum(left).item() == 0


def rollout(model, examples, tokenizer, step, args, rank, world_size, group_size=1):
    """A step's rollouts: every process draws the same global prompts and takes its share (prompt j goes to
    rank j % world, so a group stays whole), then samples group_size completions of each -> this process's
    prompts, ids (N, L), mask (N, L), the completions' texts and their rewards (N,), group by group.
    Completion g of prompt j draws from its own seed, a function of the run's seed, the step and the
    global (j, g): the same samples on any number of processes."""
    prompts = [prompt for prompt, _ in examples.batch(args.batch_size)][rank::world_size]
    first = [rank + j * world_size for j in range(len(prompts))]  # each prompt's global index
    G, device = group_size, next(model.parameters()).device
    prompt_ids = [tokenizer.encode(p) for p in prompts for _ in range(G)]
    seeds = [args.seed * 1_000_003 + step * 10_007 * args.batch_size * G + j * G + g for j in first for g in range(G)]
    model.eval()
    completions = generate(
        model, prompt_ids, args.max_new_tokens, tokenizer.eot_id, args.temperature, args.top_k, seeds=seeds
    )
    model.train()
    ids, mask = collate(prompt_ids, completions, tokenizer.eot_id, device)
    texts = decode_texts(tokenizer, completions)
    rewards = examples.reward([p for p in prompts for _ in range(G)], texts)
    return prompts, ids, mask, texts, torch.tensor(rewards, dtype=torch.float32, device=device)


def decode_texts(tokenizer, completions):
    """Completions' ids -> their texts, the EOT left out."""
    return [tokenizer.decode([t for t in c if t != tokenizer.eot_id]) for c in completions]


# -----------------------------------------------------------------------------
# Sequence log-probs: recomputed by a full forward, in the layout the losses take


def sequence_logps(model, ids, mask, temperature=1.0):
    """log p(ids[t] | ids[<t]) for each position where mask (B, L) is 1, 0 elsewhere: (B, L) float32.
    One forward over the whole right-padded sequences (what the update differentiates); the rollout's
    sampling never enters the gradient. p is the distribution the rollout sampled from, the logits
    divided by its temperature, as TRL's log-probs are (its top-k cut is not applied, as in TRL)."""
    logits = model(ids[:, :-1])[0].float() / temperature  # (B, L-1, vocab)
    target = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, L-1)
    return F.pad(target, (1, 0)) * mask  # position 0 is never a completion token


def completion_logps(model, ids, mask, temperature=1.0):
    """sequence_logps in completion_part's layout: (B, T), each row's completion tokens from column 0."""
    return completion_part(sequence_logps(model, ids, mask, temperature), mask)


def completion_part(x, mask):
    """(B, L) values at the positions of ids -> (B, T) the completion tokens' values, each row's starting
    at column 0 and right-padded with 0 (T: the longest completion): the layout TRL's losses take.
    completion_part(mask, mask) is that layout's mask."""
    starts = mask.argmax(dim=1)  # (B,) each row's first completion position
    lengths = mask.sum(dim=1).long()  # (B,)
    cols = torch.arange(int(lengths.max()), device=x.device)  # (T,)
    index = (starts[:, None] + cols).clamp(max=x.size(1) - 1)  # (B, T)
    return x.gather(1, index) * (cols < lengths[:, None])


# -----------------------------------------------------------------------------
# Metrics: the held-out reward, and the rows a run logs and writes


@torch.no_grad()
def evaluate_reward(model, examples, tokenizer, args, rank, world_size):
    """Greedy completions of the held-out prompts (each process takes a share) -> (exact-match mean, --reward
    mean, its std, mean completion length in tokens, a few (prompt, completion) samples). Exact match is
    the held-out metric whatever --reward the run trains on, so runs with different rewards compare."""
    model.eval()
    prompts = examples.eval_prompts[rank::world_size]
    completions = generate(model, [tokenizer.encode(p) for p in prompts], args.max_new_tokens, tokenizer.eot_id)
    model.train()
    texts = decode_texts(tokenizer, completions)
    exact = torch.tensor(examples.exact_match(prompts, texts), dtype=torch.float64)
    rewards = torch.tensor(examples.reward(prompts, texts), dtype=torch.float64)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
    sums = all_sum(torch.stack([exact.sum(), rewards.sum(), rewards.square().sum(), lengths.sum()]))
    n = len(examples.eval_prompts)
    mean = sums[1].item() / n
    std = math.sqrt(max(0.0, sums[2].item() / n - mean**2))
    return sums[0].item() / n, mean, std, sums[3].item() / n, list(zip(prompts, texts))[:3]


def report_reward(model, examples, tokenizer, args, rank, world_size, step, record, log):
    """Logs and records the held-out rewards; returns (exact match, --reward) means."""
    exact, mean, std, length, samples = evaluate_reward(model, examples, tokenizer, args, rank, world_size)
    log(
        f"step {step:4d} | eval exact match {exact:.3f} | eval reward ({args.reward}) {mean:.3f} +- {std:.3f} | "
        f"completion length {length:.2f}"
    )
    for prompt, completion in samples:
        log(f"    {prompt!r} -> {completion!r}")
    record(step=step, eval_exact_match=exact, eval_reward=mean, eval_reward_std=std, eval_completion_length=length)
    return exact, mean


class Metrics:
    """The rows a run records: kept in order (train returns them) and, on rank 0, written to metrics.jsonl
    in --out-dir as they come, replacing an earlier run's; with --log-completions (grpo.py) every rollout
    also goes to completions.jsonl."""

    def __init__(self, args, rank):
        self.history, self.file, self.completions = [], None, None
        if rank == 0:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(args.out_dir) / "metrics.jsonl", "w")  # noqa: SIM115 (closed by close)
            if getattr(args, "log_completions", False):
                self.completions = open(Path(args.out_dir) / "completions.jsonl", "w")  # noqa: SIM115

    def record(self, **row):
        self.history.append(row)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def record_completions(self, step, prompts, ids, mask, texts, rewards, advantages, group_size):
        """Rank 0's rollouts, one row per completion (its token ids too), in the order the loss saw them."""
        if not self.completions:
            return
        tokens = [row[: int(n)] for row, n in zip(completion_part(ids, mask).tolist(), mask.sum(-1).tolist())]
        for i, (completion, text, reward, advantage) in enumerate(
            zip(tokens, texts, rewards.tolist(), advantages.tolist())
        ):
            row = dict(step=step, prompt=prompts[i // group_size], completion=text, completion_ids=completion)
            self.completions.write(json.dumps(row | dict(reward=reward, advantage=advantage)) + "\n")
        self.completions.flush()

    def close(self):
        for file in (self.file, self.completions):
            if file:
                file.close()


class Throughput:
    """Tokens per second since the last reading (or since it was made)."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, n):
        self.tokens += n

    def read(self):
        rate = self.tokens / (time.perf_counter() - self.t0)
        self.t0, self.tokens = time.perf_counter(), 0
        return rate


def due(every, step, args):
    """Whether step (counted from 0) ends a period of `every` steps (0: no period) or ends the run."""
    return bool(every) and (step + 1) % every == 0 or step + 1 == args.steps


def reward_summary(examples, args, before, after):
    """A run's last line: the held-out (exact match, --reward) means at its start and at its end."""
    return (
        f"on {len(examples.eval_prompts)} held-out prompts: exact match {before[0]:.3f} -> {after[0]:.3f}, "
        f"reward ({args.reward}) {before[1]:.3f} -> {after[1]:.3f}"
    )


def finish(metrics):
    """Close the run's files and leave the process group."""
    metrics.close()
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Checkpoint: train.py's ckpt.pt (model, optim, meta with the Config), so train.py --generate and the
# other post-training files load it; and a Hugging Face directory, hf/


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


def save(model, optimizer, args, rank, step, extra, log, tokenizer, method):
    """Full (unsharded) state on rank 0, whatever the parallelism: one ckpt.pt any process count loads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if rank == 0:
        out_dir = Path(args.out_dir)
        meta = {
            "step": step,
            "rng": {"cpu": torch.get_rng_state()},  # train.py's --generate restores it
            "config": dataclasses.asdict(model.cfg),
            "posttrain": {"method": method, "model": args.model, "init_from": args.init_from, **extra},
            "settings": {name: value for name, value in vars(args).items() if name != "set"},
        }
        write_file(out_dir / "ckpt.pt", {"model": model_state, "optim": optim_state, "meta": meta})
        policy = SPECS[args.model].model.Transformer(model.cfg)  # a plain copy: FSDP's holds shards
        policy.load_state_dict(model_state)
        policy.save_pretrained(out_dir / "hf")
        for folder in (out_dir, out_dir / "hf"):
            save_tokenizer(tokenizer, folder)
        log(f"saved {out_dir / 'ckpt.pt'} and {out_dir / 'hf'}")
    if dist.is_initialized():
        dist.barrier()


def save_tokenizer(tokenizer, folder):
    """tokenizer.json beside the weights, which the next run (default_tokenizer) reads: the ids the policy was
    trained on. GPT-2's tiktoken ranks are bundled and have no tokenizer.json; an earlier run's is removed,
    so that it is not taken for this run's."""
    path = folder / "tokenizer.json"
    if not hasattr(tokenizer.backend, "to_str"):  # tiktoken
        path.unlink(missing_ok=True)
        return
    tmp = temp_path(path)
    try:
        tmp.write_text(tokenizer.backend.to_str())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
