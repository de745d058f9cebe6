"""Pretrain Llama 3.1 on one CPU, one GPU, or many GPUs with DDP or FSDP2 — the same file for all.
--init-from starts from a Hugging Face checkpoint or from Meta's own (params.json + consolidated.*.pth).

    python llama31/train.py                                 # tiny model, bundled Shakespeare, CPU, a few min
    python llama31/train.py --preset llama32_1b --data-dir data/fineweb10B           # 1.2B on one GPU
    torchrun --nproc_per_node 8 llama31/train.py --preset llama31_8b --parallel fsdp --data-dir data/fineweb10B
    python llama31/train.py --generate --prompt "ROMEO:"    # sample from the last checkpoint

gpt2/train.py's recipe, section for section; the scale machinery is in infra.py beside it. Changes from
gpt2/train.py: the presets' recipes (TRAINING_DEFAULTS); --init-from also reads Meta's layout (infra.py).
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

# -----------------------------------------------------------------------------
# Arguments, with the standard library only: a mistake is one line before the seconds torch takes to import

# Config.PRESETS, spelled out since model.py imports torch (tests/test_copies.py checks they agree)
PRESETS = ("tiny", "llama31_8b", "llama31_70b", "llama31_405b", "llama32_1b", "llama32_3b")

# Published recipes of the real presets: the defaults of these flags when the preset is chosen.
# The Llama 3 paper (Dubey et al. 2024, sec. 3.4.1) gives only the 405B's: peak lr 8e-5, 8,000 warmup
# steps, cosine to 8e-7, batch 4M tokens at first (8M, then 16M later). For 8B and 70B it gives none;
# these are Llama 2's (Touvron et al. 2023, sec. 2.2: 3e-4 up to 13B, 1.5e-4 for 70B, 2,000 warmup
# steps, cosine to 10%, weight decay 0.1, 4M tokens). Llama 3.2 1B/3B were pruned and distilled from
# 8B, with no pretraining recipe published: they keep the small-run defaults.
TRAINING_DEFAULTS = {
    "llama31_8b": dict(lr=3e-4, warmup_steps=2000, total_batch_tokens=2**22, min_lr_ratio=0.1, weight_decay=0.1),
    "llama31_70b": dict(lr=1.5e-4, warmup_steps=2000, total_batch_tokens=2**22, min_lr_ratio=0.1, weight_decay=0.1),
    "llama31_405b": dict(lr=8e-5, warmup_steps=8000, total_batch_tokens=2**22, min_lr_ratio=0.01),
}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad argument is one line, not the usage block and then the error; under torchrun, rank 0's only."""
        raise SystemExit(f"{self.prog}: {message} (see --help)" if os.environ.get("RANK", "0") == "0" else 1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the docstring's examples as written, and each option's default said once: argparse
    appends it unless the help already says it, or there is nothing to say (None, False, [])."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36)

    def _get_help_string(self, action):
        nothing_to_say = action.default is None or action.default is False or action.default == []
        if nothing_to_say or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    doc = __doc__.split("\n\n")
    p = ArgumentParser(description=doc[0], epilog=doc[1], formatter_class=HelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=PRESETS, help="model size")
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="set a Config field; repeatable")
    m.add_argument("--init-from", metavar="DIR", help="start from a Hugging Face checkpoint (no --preset, --set)")
    m.add_argument("--compile", action="store_true", help="torch.compile the whole forward, loss included")
    m.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="*_train_*.bin, *_val_*.bin token shards (default: bundled Shakespeare)")
    d.add_argument("--tokenizer", help="'bytes', 'gpt2', a tokenizer.json or tiktoken file (default: the data's)")
    d.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch per process")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (at most the model's block_size)")
    o = p.add_argument_group("optimizer", "A real --preset (not tiny) sets the first five to its published recipe.")
    o.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    o.add_argument("--warmup-steps", type=int, default=20, help="linear warmup")
    o.add_argument("--total-batch-tokens", type=int, help="tokens per step (default: a micro-batch per process)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    o.add_argument("--weight-decay", type=float, default=0.1, help="applied to matrices only, not norms or biases")
    o.add_argument("--schedule", default="cosine", choices=("cosine", "wsd"), help="wsd: warmup-stable-decay")
    o.add_argument("--decay-frac", type=float, default=0.2, help="wsd: fraction of steps spent decaying")
    o.add_argument("--beta1", type=float, default=0.9, help="AdamW's first-moment decay")
    o.add_argument("--beta2", type=float, default=0.95, help="AdamW's second-moment decay")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0 disables)")
    r = p.add_argument_group("run")
    r.add_argument("--max-steps", type=int, default=550, help="optimizer steps (sets the LR schedule's length)")
    r.add_argument("--stop-after", type=int, help="end after N steps, checkpointed, to --resume later")
    r.add_argument("--eval-every", type=int, default=100, help="steps between validation runs (0: only at the end)")
    r.add_argument("--eval-steps", type=int, default=20, help="validation batches per run")
    r.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    r.add_argument("--seed", type=int, default=1337, help="seeds the initial weights and the sample")
    r.add_argument("--out-dir", default=f"out/{Path(__file__).parent.name}", help="checkpoints, metrics.jsonl")
    r.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    r.add_argument("--parallel", default="none", choices=("none", "ddp", "fsdp"), help="DDP replicates, FSDP2 shards")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    r.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bfloat16 on GPU")
    r.add_argument("--peak-tflops", type=float, help="hardware peak for MFU (default: known GPUs; none on CPU)")
    s = p.add_argument_group("sampling")
    s.add_argument("--generate", action="store_true", help="only sample from the checkpoint (or --init-from)")
    s.add_argument("--prompt", default="\n", help="text the sample starts from (default: a newline)")
    s.add_argument("--sample-tokens", type=int, default=120, help="tokens sampled at the end (0: none), < --seq-len")
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens")

    # a real preset's published recipe becomes its flags' defaults, so a flag given still wins
    first = ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=PRESETS)
    preset = first.parse_known_args(argv)[0].preset  # None: not on the command line
    recipe = TRAINING_DEFAULTS.get(preset, {})
    p.set_defaults(**recipe)
    args = p.parse_args(argv)
    if args.init_from and (preset or args.set):
        p.error("--init-from takes the architecture from its config.json: drop --preset and --set")
    args.recipe = {name: value for name, value in recipe.items() if getattr(args, name) == value}  # for the log
    if args.resume and args.init_from:
        p.error("--resume and --init-from are exclusive: a checkpoint already holds the weights")
    check_args(args, p)
    return args


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
    if args.max_steps < args.warmup_steps and not args.generate and os.environ.get("RANK", "0") == "0":
        short = f"--max-steps {args.max_steps} is below --warmup-steps {args.warmup_steps}: the learning rate never reaches --lr"
        print(f"warning: {short}", file=sys.stderr)


if __name__ == "__main__":  # run as a script: the arguments are checked before the imports below
    ARGS = parse_args()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llama31.infra import (  # noqa: E402
    Prefetcher,
    Run,
    StepFigures,
    all_mean,
    build_model,
    config_from_args,
    data_loaders,
    load_tokenizer_for,
    plan_memory,
    run_settings,
    set_gradient_sync,
)
from shared.data import DataError  # noqa: E402

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


def precision(args, device):
    """(compute dtype, autocast context): bfloat16 mixed precision on GPU by default. FSDP casts through
    its mixed-precision policy; elsewhere autocast does."""
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    use_autocast = compute_dtype != torch.float32 and args.parallel != "fsdp"
    return compute_dtype, torch.autocast(device.type, dtype=compute_dtype, enabled=use_autocast)


def batch_tokens(args, cfg, world_size):
    """(tokens per optimizer step, micro-batches per process that make it: gradient accumulation).
    --generate trains nothing, so neither is checked: sampling reads no --seq-len or batch."""
    if args.seq_len > cfg.block_size and not args.generate:
        raise SystemExit(f"--seq-len {args.seq_len} is longer than the model's block_size {cfg.block_size}")
    tokens_per_micro = args.batch_size * args.seq_len * world_size
    total_batch = args.total_batch_tokens or tokens_per_micro
    if total_batch % tokens_per_micro and not args.generate:
        raise SystemExit(
            f"--total-batch-tokens {total_batch} is not a multiple of batch-size x seq-len x "
            f"processes = {tokens_per_micro}"
        )
    return total_batch, total_batch // tokens_per_micro


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def make_optimizer(model, args, device):
    # decay matrices (embeddings, linear weights); not biases or norm gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")


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
# What this model changes about training: the extension points. The loop calls them at fixed
# places in every model's train.py; `make_optimizer` and `TrainingExtras` are the only code that
# may differ between the copies, besides TRAINING_DEFAULTS and the names a model adds, each marked
# `# diff vs <sibling>: <why>` (tests/test_copies.py checks the rest, and their signatures).


class TrainingExtras:
    """Nothing beyond the loss: every hook is a no-op. A model that needs more (statistics from its
    forward's aux dict, an update after each optimizer step) fills these methods in."""

    def __init__(self, model, args, device):
        pass

    def describe(self):
        """Extra words for the start-up log line."""
        return ""

    def after_forward(self, aux):
        """Called with the aux dict the model's forward filled, once per micro-batch."""

    def after_step(self, model):
        """Called on every rank after each optimizer step (e.g. a router-bias update or a weight rescale)."""

    def summary(self):
        """Figures since the last summary, reduced over ranks, to log and record: {name: float}."""
        return {}


# -----------------------------------------------------------------------------
# Evaluation and hardware peak


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


# -----------------------------------------------------------------------------
# Training


def train(args):
    """Set-up, each call refusing in one line what cannot work, before anything large is allocated;
    then the loop. Returns the rows written to metrics.jsonl."""
    rank, world_size, device = setup_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    compute_dtype, autocast = precision(args, device)
    cfg = config_from_args(args)
    total_batch, accum = batch_tokens(args, cfg, world_size)
    # the run in --out-dir: a new one, or the checkpoint to --resume or --generate from
    run = Run(args, cfg, run_settings(args, total_batch, compute_dtype), rank, device, log)
    memory = plan_memory(args, cfg, world_size, device, compute_dtype)  # refuses a run that cannot fit
    model, wrapped = build_model(args, cfg, device, compute_dtype)
    optimizer = make_optimizer(model, args, device)
    extras = TrainingExtras(model, args, device)
    tokenizer = load_tokenizer_for(args, cfg)
    step = run.restore(model, optimizer)
    if args.generate:
        print_sample(model, tokenizer, args, device, autocast, log)
        return []
    train_loader, val_loader = data_loaders(args, cfg, rank, world_size, log)
    log(
        f"{model.num_params():,} parameters{extras.describe()} | {world_size} process(es), {args.parallel} | "
        f"{device} {compute_dtype} | {total_batch:,} tokens per step = {accum} micro-batch(es) of "
        f"{args.batch_size}x{args.seq_len} per process"
    )
    log(memory)
    if args.recipe:
        given = ", ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in args.recipe.items())
        log(f"from the {args.preset} preset's published recipe (TRAINING_DEFAULTS): {given}")
    run.start(train_loader)

    batches = Prefetcher(train_loader, device)  # on CUDA: pinned, copied one batch ahead
    figures = StepFigures(run)  # each step's loss and grad norm, read only where the loop may wait
    flops_per_token, peak = model.flops_per_token(args.seq_len), peak_flops(args, device, compute_dtype)
    last_step = min(args.max_steps, step + args.stop_after) if args.stop_after else args.max_steps
    t0, last_logged = time.perf_counter(), step
    while step < last_step:
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = batches.next_batch()
            set_gradient_sync(wrapped, args, enabled=micro == accum - 1)
            aux = {}  # the forward's own statistics, e.g. a mixture of experts' load
            with autocast:
                _, loss = wrapped(x, y, aux=aux)
            (loss / accum).backward()  # accumulated gradients = gradient of the mean loss
            loss_sum += loss.detach()
            extras.after_forward(aux)
        lr = lr_at(step, args)
        figures.add(step, lr, loss_sum / accum)
        if run.pending:  # the last step's checkpoint: written once this forward has proved its weights finite
            figures.read()
            run.save_pending(model, optimizer)
        figures.add_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")))
        step += 1
        log_step = step % args.log_every == 0 or step == args.max_steps
        eval_step = (args.eval_every and step % args.eval_every == 0) or step == args.max_steps
        ckpt_step = (args.ckpt_every and step % args.ckpt_every == 0) or step == last_step
        waits = log_step or eval_step or ckpt_step  # a step that may wait for the device: it reads, before updating
        if waits:
            figures.read()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        extras.after_step(model)

        stats = extras.summary() if log_step else {}
        for done, lr, train_loss, grad_norm in figures.take() if waits else []:  # noqa: B007 (logged below)
            run.record(step=done + 1, loss=train_loss, lr=lr, **(stats if done + 1 == step else {}))
        if log_step:
            tokens_per_s = total_batch * (step - last_logged) / (time.perf_counter() - t0)
            mfu = flops_per_token * tokens_per_s / peak if peak else None
            log(
                f"step {step:5d} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_s:,.0f} tok/s"
                + (f" | MFU {100 * mfu:.1f}%" if mfu else "")
                + "".join(f" | {name} {value:.4g}" for name, value in stats.items())
            )
            t0, last_logged = time.perf_counter(), step
        if eval_step:
            val_loss = evaluate(wrapped, val_loader, args, device, autocast, rank, world_size)
            baseline = f" (unigram baseline {val_loader.unigram:.2f})" if val_loader.unigram else ""
            log(f"step {step:5d} | val loss {val_loss:.4f}{baseline}")
            run.record(step=step, val_loss=val_loss)
        if ckpt_step:
            run.snapshot(step, batches)  # written during the next step, once its forward is finite
    if run.pending:  # the run's last weights: one forward on the next batch, without an update, proves them
        with torch.no_grad(), autocast:
            loss = all_mean(wrapped(*batches.next_batch())[1].float()).item()
        if not math.isfinite(loss):
            run.stop(f"loss is {loss} at step {step}")
        run.save_pending(model, optimizer)

    if args.sample_tokens:
        print_sample(model, tokenizer, args, device, autocast, log)
    run.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return run.history


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
    with autocast, torch.compiler.set_stance("force_eager"):  # decoding: not the compiled training forward
        out = model.generate(idx, n, temperature=args.temperature, top_k=args.top_k, generator=generator)
    log("-" * 80 + "\n" + tokenizer.decode(out[0].tolist()) + "\n" + "-" * 80)


def main(argv=None, args=None):
    """Train, or sample with --generate, from argv or from arguments parsed already. A user's mistake
    ends the run with one line (SystemExit); anything else keeps its traceback."""
    try:
        return train(args or parse_args(argv))
    except DataError as e:  # a shard or data directory that cannot be used; the message names it
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    try:
        main(args=ARGS)
    except SystemExit as e:  # a user error's one line: under torchrun, rank 0 alone prints it
        if isinstance(e.code, str) and int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(1) from None
        raise
