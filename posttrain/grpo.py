"""Group Relative Policy Optimization (GRPO) and Group Sequence Policy Optimization (GSPO): sample
G completions per prompt, score them, and use each completion's reward relative to its group as
the advantage of every one of its tokens, so no value model is needed (Shao et al. 2024,
"DeepSeekMath", sec. 4.1, eq. 3). The update is PPO's clipped surrogate (Schulman et al. 2017) with
an optional k3 KL penalty to a frozen reference.

- GSPO (Zheng et al. 2025, eq. 7) clips one importance ratio per sequence, the geometric mean of
  its token ratios, instead of one per token: importance_sampling_level="sequence".
- DAPO (Yu et al. 2025) clips asymmetrically (epsilon_high > epsilon_low, "clip-higher", sec. 3.1)
  and averages over all tokens of the batch (sec. 3.3, eq. 12): loss_type="dapo".
- Dr. GRPO (Liu et al. 2025, sec. 3.2) divides by a constant, B x max_completion_length, so neither
  length nor reward spread biases the update, and may skip the std scaling (scale_rewards="none").

Conventions (advantage scaling, clipping, KL, the four aggregations) are TRL's GRPOTrainer (trl 1.16,
trl/trainer/grpo_trainer.py), checked on identical tensors in tests/test_posttrain_losses.py.

    python posttrain/sft.py && python posttrain/grpo.py      # SFT, then GRPO from out/sft: CPU, minutes
    python posttrain/grpo.py --importance-sampling-level sequence --epsilon 3e-4 --epsilon-high 4e-4 --beta 0  # GSPO
    torchrun --nproc_per_node 2 posttrain/grpo.py --parallel fsdp          # whole groups per process

The trainer below the loss is sft.py's skeleton (the shared sections byte-identical, see
tests/test_posttrain_copies.py): each step samples --group-size completions of --batch-size prompts
with the KV cache, scores them, and makes --num-iterations clipped updates on that batch, the
rollout policy's log-probs as old_logps. Reward on held-out prompts (greedy) is measured before and
after.
"""

import argparse
import copy
import dataclasses
import importlib
import json
import math
import os
import random
import secrets
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shared.data import fsync_dir
from shared.models import MODELS
from shared.tokenizer import ENDOFTEXT, Tokenizer, load_tokenizer

# -----------------------------------------------------------------------------
# Loss

SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Advantages (N,) of N = groups x group_size rewards laid out group by group.

    Each reward minus its group's mean (eq. 3's baseline), then divided by the std (unbiased) + 1e-4
    of its group ('group', the paper), of the whole batch ('batch', more robust to groups whose rewards
    barely differ), or not at all ('none', Dr. GRPO).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"group_advantages: scale_rewards {scale_rewards!r} is not one of {SCALE_REWARDS}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    grouped = rewards.view(-1, group_size)  # (groups, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else 0.0
        return advantages / (std + 1e-4)
    if scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else 0.0
        return advantages / (std + 1e-4)
    return advantages


def masked_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,): mean over each row's completion tokens (an empty row counts one token)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    loss_type: str = "dapo",
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Clipped policy-gradient loss of a batch of B completions, T tokens each (right-padded).

    logps, old_logps, ref_logps: (B, T) log-probs of the sampled tokens under the policy being
    trained, the policy that sampled them (None: on-policy, the same values detached) and the
    reference (read only when beta > 0). advantages: (B,) (or (B, T)). mask: (B, T) 0/1.
    max_completion_length: dr_grpo's constant (default T). num_items_in_batch: dapo's denominator,
    the loss being this batch's masked sum / num_items_in_batch (default: this batch's mask.sum()).
    For the token mean over a generation batch split across P ranks whose gradients DDP averages,
    pass its token count / P, as TRL 1.16 divides num_items_in_batch by num_processes.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type {loss_type!r} is not one of {GRPO_LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"grpo_loss: importance_sampling_level {importance_sampling_level!r} is not one of {IMPORTANCE_SAMPLING_LEVELS}"
        )
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logps")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1): one advantage for every token of a completion
    if old_logps is None:
        old_logps = logps.detach()  # on-policy: ratio 1 in value, its gradient that of logps
    log_ratio = logps - old_logps  # (B, T)
    if importance_sampling_level == "sequence":
        # GSPO eq. 7: s = (pi/pi_old of the whole sequence)^(1/|y|) = exp(mean token log-ratio), (B, 1)
        log_ratio = masked_sequence_mean(log_ratio, mask).unsqueeze(1)
    ratio = torch.exp(log_ratio)
    # PPO's clipped surrogate (GRPO eq. 3), two-sided with DAPO's decoupled bounds (eq. 10)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)  # (B, T) or (B, 1)
    if beta != 0.0:
        # k3 estimator of KL(pi || pi_ref) (GRPO eq. 4): exp(r) - r - 1 with r = log pi_ref - log pi, >= 0
        ref_log_ratio = ref_logps - logps
        per_token_kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1
        if use_bias_correction_kl:
            # the samples come from pi_old, so weigh the estimate by pi/pi_old to make it unbiased
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl
    return aggregate(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch)


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None,
    num_items_in_batch: torch.Tensor | float | None,
) -> torch.Tensor:
    """Reduce (B, T) (or (B, 1), broadcast over the mask) to a scalar as each method prescribes."""
    masked = per_token_loss * mask  # (B, T)
    if loss_type == "grpo":  # eq. 3: mean over each sequence's tokens, then over sequences
        return masked_sequence_mean(per_token_loss, mask).mean()
    if loss_type == "bnpo":  # mean over all tokens of this batch
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":  # a constant denominator: B x the longest completion allowed
        length = mask.size(1) if max_completion_length is None else max_completion_length
        return masked.sum() / (per_token_loss.size(0) * length)
    # dapo, eq. 12: mean over all tokens of the generation batch, however it is split into micro-batches
    items = (
        mask.sum()
        if num_items_in_batch is None
        else torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device)
    )
    return masked.sum() / items.clamp(min=1.0)


# -----------------------------------------------------------------------------
# Arguments

SPECS = {spec.name: spec for spec in MODELS}
# RoPE learns the toy tasks' relative positions several times faster than GPT-2's learned absolute ones
DEFAULT_MODEL = "llama31"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad argument is one line, not the usage block and then the error."""
        raise SystemExit(f"{self.prog}: {message} (see --help)")


def common_parser(doc):
    """The arguments every post-training file takes; each file sets its own defaults and adds its own."""
    p = ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=36),
    )
    m = p.add_argument_group("policy")
    m.add_argument(
        "--model",
        choices=SPECS,
        help="architecture, shared/models.py's names (default: the one a post-training checkpoint records, "
        f"else {DEFAULT_MODEL})",
    )
    m.add_argument(
        "--init-from",
        metavar="PATH",
        help="a train.py or post-training out dir (its ckpt.pt), a ckpt.pt file, a Hugging Face directory "
        "(config.json), or 'none': a fresh small model",
    )
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a fresh model only: override a field of the registry's small Config, e.g. --set n_layer=4",
    )
    d = p.add_argument_group("task")
    d.add_argument("--task", default="reverse", help=f"a built-in toy task: {', '.join(TASKS)}")
    d.add_argument(
        "--data",
        help="instead of --task: prompt/completion pairs, a .jsonl or .parquet file or a hub dataset name "
        "(read with `datasets`; the last --eval-prompts rows are held out)",
    )
    d.add_argument(
        "--reward",
        default="exact",
        metavar="NAME|MODULE.FUNCTION",
        help="'exact' (1 for the answer, else 0), 'partial' (the share of the answer's words in place), or a "
        "dotted path to f(prompts, completions) -> list[float] (default: %(default)s)",
    )
    d.add_argument(
        "--tokenizer",
        help="'gpt2', 'task' (the toy tasks' word-level vocabulary), or a directory or file with tokenizer.json "
        "(default: the --init-from directory's tokenizer.json, else 'task' for a fresh model on a toy task, "
        "else 'gpt2')",
    )
    d.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts the reward is measured on")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, help="optimizer steps")
    o.add_argument("--batch-size", type=int, help="prompts per step over all processes")
    o.add_argument("--lr", type=float, help="peak learning rate (linear warmup, cosine to a tenth)")
    o.add_argument("--warmup-steps", type=int, default=10)
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, on matrices only")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0 disables)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=8, help="longest completion sampled")
    s.add_argument("--temperature", type=float, default=1.0, help="of the rollouts (evaluation is greedy)")
    s.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only (default: all)")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=50, help="steps between reward evaluations (0: end only)")
    r.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    r.add_argument("--out-dir", help="ckpt.pt, hf/ and metrics.jsonl go here")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--parallel",
        default="none",
        choices=("none", "ddp", "fsdp"),
        help="data parallelism under torchrun: DDP replicates the policy, FSDP2 shards it",
    )
    return p


def check_args(args, p, rules=()):
    """Refuse, up front and in one line, a value that would crash later or silently do nothing.
    Each rule is written so that nan fails it too; a file passes its own rules beside these."""
    common = [
        ("steps batch_size max_new_tokens eval_prompts log_every", lambda v: v >= 1, "at least 1"),
        ("top_k", lambda v: v is None or v >= 1, "at least 1"),
        ("warmup_steps eval_every", lambda v: v >= 0, "0 or more"),
        ("lr", lambda v: 0 < v < math.inf, "a positive number"),
        ("weight_decay grad_clip temperature", lambda v: 0 <= v < math.inf, "0 or more"),
    ]
    for names, ok, rule in [*common, *rules]:
        for name in names.split():
            if not ok(getattr(args, name)):
                p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {rule}")
    if args.task not in TASKS:
        p.error(f"--task {args.task!r}: choose one of {', '.join(TASKS)}")


def parse_args(argv=None):
    p = common_parser(__doc__)
    g = p.add_argument_group("GRPO / GSPO")
    g.add_argument("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    g.add_argument(
        "--num-iterations",
        type=int,
        default=2,
        help="mu: clipped updates per rollout batch (GRPO's mu, TRL's num_iterations; 1: on-policy, no clipping)",
    )
    g.add_argument(
        "--beta",
        type=float,
        default=0.04,
        help="KL coefficient to the frozen initial policy (the GRPO paper's 0.04; 0: no reference model, as TRL's default)",
    )
    g.add_argument("--epsilon", type=float, default=0.2, help="clip range below 1 (and above, unless --epsilon-high)")
    g.add_argument("--epsilon-high", type=float, help="clip range above 1 (DAPO's clip-higher: 0.28)")
    g.add_argument(
        "--importance-sampling-level",
        default="token",
        choices=("token", "sequence"),
        help="sequence: GSPO (Zheng et al. 2025; their settings: --epsilon 3e-4 --epsilon-high 4e-4 --beta 0)",
    )
    g.add_argument("--loss-type", default="dapo", choices=("grpo", "bnpo", "dr_grpo", "dapo"), help="as TRL's")
    g.add_argument("--scale-rewards", default="group", choices=("group", "batch", "none"), help="advantage std")
    g.add_argument("--log-completions", action="store_true", help="write every rollout to completions.jsonl")
    # the SFT run's output: GRPO needs a policy whose samples already earn some reward. The dense reward
    # ('partial') tells a near miss from a far one, where exact match gives a group of misses no advantage
    p.set_defaults(init_from="out/sft", steps=300, batch_size=32, lr=1e-3, reward="partial", out_dir="out/grpo")
    args = p.parse_args(argv)
    rules = [
        ("group_size", lambda v: v >= 2, "at least 2 (advantages compare a group's completions)"),
        ("num_iterations", lambda v: v >= 1, "at least 1"),
        ("beta epsilon", lambda v: 0 <= v < math.inf, "0 or more"),
        ("epsilon_high", lambda v: v is None or 0 <= v < math.inf, "0 or more"),
    ]
    check_args(args, p, rules)
    if args.temperature == 0:
        p.error("--temperature 0: greedy completions of a prompt are all the same, and their advantages 0")
    return args


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


def all_sum(x: torch.Tensor):
    """x summed over the processes (x itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# -----------------------------------------------------------------------------
# Policy: a train.py checkpoint, a Hugging Face directory, or a fresh small model


def load_policy(args, tokenizer, log):
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
    raise SystemExit(f"--init-from {path}: no ckpt.pt or config.json there{hint}")


def policy_path(args):
    """Where load_policy reads the policy, None for a fresh model; sets args.model if --model is not given."""
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
        return spec.train.parse_overrides(items)
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


# -----------------------------------------------------------------------------
# Task and rewards: built-in verifiable toy tasks, or prompt/completion data; a reward function
# f(prompts, completions) -> list[float] over decoded text


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """Prompts drawn from a seeded RNG, answers computed from the prompt. Letters and numbers are
    written with spaces so each is one token, GPT-2's or task_vocabulary's: 'reverse: c a t =' -> ' t a c'."""

    name: str
    make: callable  # random.Random -> prompt
    solve: callable  # prompt -> answer (the completion, with its leading space)


LETTERS = "abcdefghijklmnopqrstuvwxyz"
ADDENDS = range(50)  # add's operands, so its answers are 0 to 98


def letters(rng, alphabet=LETTERS):
    return " ".join(rng.choice(alphabet) for _ in range(rng.randint(3, 5)))


def operands(prompt):  # 'reverse: c a t =' -> ['c', 'a', 't']
    return prompt.split(":", 1)[1].removesuffix("=").split()


TASKS = {
    task.name: task
    for task in (
        ToyTask("reverse", lambda rng: f"reverse: {letters(rng)} =", lambda p: " " + " ".join(operands(p)[::-1])),
        ToyTask("sort", lambda rng: f"sort: {letters(rng)} =", lambda p: " " + " ".join(sorted(operands(p)))),
        ToyTask(
            "add",
            lambda rng: f"add: {rng.choice(ADDENDS)} + {rng.choice(ADDENDS)} =",
            lambda p: f" {sum(int(x) for x in operands(p) if x != '+')}",
        ),
    )
}


def task_vocabulary():
    """The toy tasks' words as a word-level tokenizer (a Hugging Face tokenizer.json, so shared/tokenizer.py
    reads it back): each word with its leading space is one id, as it is in GPT-2 (' t'), and decoding
    joins the words as they were, so every prompt and answer round-trips exactly. 131 ids instead of
    GPT-2's 50,257: at the small config's width the embedding and head are then a small part of the model
    instead of 98% of it, and a CPU step is many times faster. Id 0 is the end of text."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    numbers = range(2 * max(ADDENDS) + 1)
    words = [ENDOFTEXT, *(f"{name}:" for name in TASKS), " =", " +", *(f" {c}" for c in LETTERS)]
    words += [f" {n}" for n in numbers]
    backend = tokenizers.Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}))  # no unknown word
    # 'reverse: c' -> 'reverse:', ' c': a word and the space before it
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\S+"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate, adding no spaces
    return Tokenizer(backend, eot_id=0, name="task")


class Examples:
    """The training stream and the held-out evaluation prompts of a task or a dataset. Every process
    draws the same global batch from its own copy of the seeded RNG and keeps its share."""

    def __init__(self, args):
        self.rng = random.Random(args.seed)
        if args.data:
            rows = read_pairs(args.data)
            if len(rows) <= args.eval_prompts:
                raise SystemExit(f"--data {args.data}: {len(rows)} rows, not more than --eval-prompts")
            self.train, held_out = rows[: -args.eval_prompts], rows[-args.eval_prompts :]
            self.eval_prompts = [prompt for prompt, _ in held_out]
            self.answers = dict(rows)
        else:
            task, eval_rng = TASKS[args.task], random.Random(-1 - args.seed)  # another stream than training's
            self.eval_prompts = unique_prompts(task, eval_rng, args.eval_prompts, exclude=set())
            self.task, self.held_out = task, set(self.eval_prompts)
        self.reward = self.named_reward(args.reward) or load_reward(args.reward)

    def named_reward(self, name):
        return {"exact": self.exact_match, "partial": self.partial_credit}.get(name)

    def batch(self, n):
        """n (prompt, completion) pairs, none of them a held-out prompt."""
        if hasattr(self, "train"):
            return [self.rng.choice(self.train) for _ in range(n)]
        prompts = [self.draw_training_prompt() for _ in range(n)]
        return [(prompt, self.task.solve(prompt)) for prompt in prompts]

    def draw_training_prompt(self):
        while (prompt := self.task.make(self.rng)) in self.held_out:
            pass
        return prompt

    def answer(self, prompt):
        return self.answers[prompt] if hasattr(self, "answers") else self.task.solve(prompt)

    def exact_match(self, prompts, completions):
        return [float(completion == self.answer(prompt)) for prompt, completion in zip(prompts, completions)]

    def partial_credit(self, prompts, completions):
        return [words_in_place(completion, self.answer(prompt)) for prompt, completion in zip(prompts, completions)]


def words_in_place(completion, answer):
    """A dense reward for RL from a weak start: the share of positions where the completion has the answer's
    word, over the longer of the two (a missing or an extra word costs alike). 1 for the answer, 0 for an
    empty completion; ' t a x' -> 2/3 against ' t a c'. Exact match gives a policy that solves a fifth
    of the prompts a zero advantage on most groups; this ranks the near misses above the far ones."""
    got, want = completion.split(), answer.split()
    if not want:
        return float(not got)
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


def unique_prompts(task, rng, n, exclude):
    prompts = []
    for _ in range(100 * n):
        prompt = task.make(rng)
        if prompt not in exclude and prompt not in prompts:
            prompts.append(prompt)
            if len(prompts) == n:
                return prompts
    raise SystemExit(f"--task {task.name}: cannot draw {n} distinct prompts; lower --eval-prompts")


def read_table(name, columns):
    """A .jsonl/.json or .parquet file, or a hub dataset's train split, as a datasets.Dataset that has
    (at least) `columns`; any problem is one line naming the input."""
    import datasets

    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(name).suffix)
    try:
        data = datasets.load_dataset(kind, data_files=name, split="train") if kind else datasets.load_dataset(name)
        data = data["train"] if isinstance(data, datasets.DatasetDict) else data
    except Exception as e:  # datasets raises many kinds: one line naming the input
        raise SystemExit(f"--data {name}: cannot read it ({type(e).__name__}: {e})") from None
    missing = set(columns) - set(data.column_names)
    if missing:
        raise SystemExit(f"--data {name}: no {', '.join(sorted(missing))} column (has {', '.join(data.column_names)})")
    return data


def read_pairs(name):
    """[(prompt, completion)] from a .jsonl/.json or .parquet file, or a hub dataset's train split."""
    data = read_table(name, ("prompt", "completion"))
    return list(zip(data["prompt"], data["completion"]))


def load_reward(path):
    """'package.module.function' (or 'package.module:function') -> the callable."""
    module, _, name = path.replace(":", ".").rpartition(".")
    try:
        reward = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"--reward {path}: cannot import it ({e})") from None
    if not callable(reward):
        raise SystemExit(f"--reward {path}: not a callable")
    return reward


def encode_pairs(tokenizer, pairs):
    """[(prompt, completion)] -> ([prompt ids], [completion ids + EOT]): the EOT teaches the policy to stop."""
    prompts = [tokenizer.encode(prompt) for prompt, _ in pairs]
    completions = [tokenizer.encode(completion) + [tokenizer.eot_id] for _, completion in pairs]
    return prompts, completions


def collate(prompts, completions, pad_id, device):
    """Token lists -> ids (B, L), prompt then completion, right-padded; mask (B, L) 1 on completion tokens.
    Right padding needs no attention mask: causal attention never lets a real token see the padding."""
    rows = [p + c for p, c in zip(prompts, completions)]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p) : len(p) + len(c)] = 1.0
    return ids.to(device), mask.to(device)


def check_lengths(prompts, args, block_size):
    longest = max(map(len, prompts))
    if longest + args.max_new_tokens > block_size:
        raise SystemExit(
            f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the policy's "
            f"block_size {block_size}"
        )


# -----------------------------------------------------------------------------
# Rollouts: batched sampling with the KV cache; logprobs recomputed by a full forward


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


def sequence_logps(model, ids, mask, temperature=1.0):
    """log p(ids[t] | ids[<t]) for each position where mask (B, L) is 1, 0 elsewhere: (B, L) float32.
    One forward over the whole right-padded sequences (what the update differentiates); the rollout's
    sampling never enters the gradient. p is the distribution the rollout sampled from, the logits
    divided by its temperature, as TRL's log-probs are (its top-k cut is not applied, as in TRL)."""
    logits = model(ids[:, :-1])[0].float() / temperature  # (B, L-1, vocab)
    target = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, L-1)
    return F.pad(target, (1, 0)) * mask  # position 0 is never a completion token


def completion_part(x, mask):
    """(B, L) values at the positions of ids -> (B, T) the completion tokens' values, each row's starting
    at column 0 and right-padded with 0 (T: the longest completion): the layout TRL's losses take.
    completion_part(mask, mask) is that layout's mask."""
    starts = mask.argmax(dim=1)  # (B,) each row's first completion position
    lengths = mask.sum(dim=1).long()  # (B,)
    cols = torch.arange(int(lengths.max()), device=x.device)  # (T,)
    index = (starts[:, None] + cols).clamp(max=x.size(1) - 1)  # (B, T)
    return x.gather(1, index) * (cols < lengths[:, None])


@torch.no_grad()
def evaluate_reward(model, examples, tokenizer, args, rank, world_size):
    """Greedy completions of the held-out prompts (each process takes a share) -> (exact-match mean, --reward
    mean, its std, mean completion length in tokens, a few (prompt, completion) samples). Exact match is
    the held-out metric whatever --reward the run trains on, so runs with different rewards compare."""
    model.eval()
    prompts = examples.eval_prompts[rank::world_size]
    completions = generate(model, [tokenizer.encode(p) for p in prompts], args.max_new_tokens, tokenizer.eot_id)
    model.train()
    texts = [tokenizer.decode([t for t in c if t != tokenizer.eot_id]) for c in completions]
    exact = torch.tensor(examples.exact_match(prompts, texts), dtype=torch.float64)
    rewards = torch.tensor(examples.reward(prompts, texts), dtype=torch.float64)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
    sums = all_sum(torch.stack([exact.sum(), rewards.sum(), rewards.square().sum(), lengths.sum()]))
    n = len(examples.eval_prompts)
    mean = sums[1].item() / n
    std = math.sqrt(max(0.0, sums[2].item() / n - mean**2))
    return sums[0].item() / n, mean, std, sums[3].item() / n, list(zip(prompts, texts))[:3]


# -----------------------------------------------------------------------------
# Update loop


def train(args):
    rank, world_size, device = setup_distributed(args)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of the {world_size} processes")
    tokenizer = open_tokenizer(args)
    examples = Examples(args)
    model, source = load_policy(args, tokenizer, log)
    check_lengths([tokenizer.encode(p) for p in examples.eval_prompts], args, model.cfg.block_size)
    reference = frozen_reference(model, args, device) if args.beta > 0 else None
    wrapped = wrap_policy(model, args, device)
    optimizer = make_optimizer(model, args, device)
    log(
        f"policy: {source}, {model.num_params():,} parameters | {world_size} process(es), {args.parallel} | {device} | "
        f"{args.batch_size} prompts x {args.group_size} completions per step, {args.num_iterations} update(s) each"
    )
    metrics = open_metrics(args, is_main)
    samples = open_completions(args, is_main)
    history = []

    def record(**row):
        history.append(row)
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    before = report_reward(model, examples, tokenizer, args, rank, world_size, 0, record, log)
    after, t0, tokens = before, time.perf_counter(), 0
    for step in range(args.steps):
        # every process draws the same global prompts and keeps whole groups: prompt j goes to rank j % world
        prompts = [prompt for prompt, _ in examples.batch(args.batch_size)][rank::world_size]
        first = [rank + j * world_size for j in range(len(prompts))]  # each prompt's global index
        ids, mask, texts, rewards = rollout(model, examples, tokenizer, prompts, first, step, args, device)
        advantages = local_part(group_advantages(all_gather(rewards), args.group_size, args.scale_rewards), rank)
        cmask = completion_part(mask, mask)  # (N, T): TRL's layout, completions from column 0
        num_items = all_sum(cmask.sum()) / world_size  # TRL's dapo normaliser: global tokens / processes
        with torch.no_grad():  # the rollout policy's and the reference's logprobs, fixed through the updates
            old = (
                completion_part(sequence_logps(model, ids, mask, args.temperature), mask)
                if args.num_iterations > 1
                else None
            )
            ref = (
                completion_part(sequence_logps(reference, ids, mask, args.temperature), mask)
                if reference is not None
                else None
            )
        stats = []
        for _ in range(args.num_iterations):
            logps = completion_part(sequence_logps(wrapped, ids, mask, args.temperature), mask)
            loss = grpo_loss(
                logps,
                old,
                ref,
                advantages,
                cmask,
                beta=args.beta,
                epsilon_low=args.epsilon,
                epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
                importance_sampling_level=args.importance_sampling_level,
                loss_type=args.loss_type,
                max_completion_length=args.max_new_tokens,
                num_items_in_batch=num_items,
            )
            loss.backward()  # DDP and FSDP average the processes' gradients: each loss is a process's share
            grad_norm = clip_gradients(model, args)
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats.append(update_stats(loss.detach(), logps.detach(), old, ref, advantages, cmask, args))
        row = dict(step=step + 1, lr=lr, grad_norm=grad_norm, **average_stats(stats, world_size))
        row.update(reward_stats(rewards))
        if not math.isfinite(row["loss"]):
            raise SystemExit(f"loss is {row['loss']} at step {step + 1}: stopping without saving")
        if samples:
            tokens_of = [row[: int(n)] for row, n in zip(completion_part(ids, mask).tolist(), cmask.sum(-1).tolist())]
            write_completions(samples, step + 1, prompts, tokens_of, texts, rewards, advantages, args.group_size)
        tokens += all_sum(torch.tensor(ids.numel())).item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            row["tokens_per_s"] = tokens / (time.perf_counter() - t0)
            log(
                f"step {step + 1:4d} | loss {row['loss']:.4f} | reward {row['reward']:.3f} +- {row['reward_std']:.3f} | "
                f"kl {row['kl']:.4f} | clip {row['clip_fraction']:.3f} | entropy {row['entropy']:.3f} | "
                f"length {row['completion_length']:.2f} | {row['tokens_per_s']:,.0f} tok/s"
            )
            t0, tokens = time.perf_counter(), 0
        record(**row)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.steps:
            after = report_reward(model, examples, tokenizer, args, rank, world_size, step + 1, record, log)
    extra = {name: {"before": b, "after": a} for name, b, a in zip(("exact_match", "reward"), before, after)}
    save(model, optimizer, args, rank, step=args.steps, extra=extra, log=log, tokenizer=tokenizer)
    log(
        f"on {len(examples.eval_prompts)} held-out prompts: exact match {before[0]:.3f} -> {after[0]:.3f}, "
        f"reward ({args.reward}) {before[1]:.3f} -> {after[1]:.3f}"
    )
    sampled = [row["reward"] for row in history if "reward" in row]
    k = max(1, len(sampled) // 5)  # the first and last fifths of the run: one step's reward is noisy
    log(
        f"rollout reward (sampled), first {k} -> last {k} steps: {sum(sampled[:k]) / k:.3f} -> {sum(sampled[-k:]) / k:.3f}"
    )
    for file in (metrics, samples):
        if file:
            file.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return history


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


def rollout(model, examples, tokenizer, prompts, first, step, args, device):
    """G sampled completions of each prompt, group by group -> ids (N, L), mask (N, L), the completions'
    texts and their rewards (N,). Row g of prompt j draws from its own seed, a function of the run's seed,
    the step and the global (prompt, g): the same samples on any number of processes."""
    G = args.group_size
    prompt_ids = [tokenizer.encode(p) for p in prompts for _ in range(G)]
    seeds = [args.seed * 1_000_003 + step * 10_007 * args.batch_size * G + j * G + g for j in first for g in range(G)]
    model.eval()
    completions = generate(
        model, prompt_ids, args.max_new_tokens, tokenizer.eot_id, args.temperature, args.top_k, seeds=seeds
    )
    model.train()
    ids, mask = collate(prompt_ids, completions, tokenizer.eot_id, device)
    texts = [tokenizer.decode([t for t in c if t != tokenizer.eot_id]) for c in completions]
    rewards = examples.reward([p for p in prompts for _ in range(G)], texts)
    return ids, mask, texts, torch.tensor(rewards, dtype=torch.float32, device=device)


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


@torch.no_grad()
def update_stats(loss, logps, old, ref, advantages, cmask, args):
    """Sums over this process's completion tokens (or sequences): KL to the reference (k3, Schulman 2020),
    the clipped share of importance ratios (clipped where the clip binds: ratio below 1 - eps with a
    negative advantage, above 1 + eps_high with a positive one, as TRL counts), and the entropy estimated
    by the sampled tokens' -log p (its Monte-Carlo estimate at temperature 1)."""
    n_tokens = cmask.sum()
    kl = ((ref - logps).exp() - (ref - logps) - 1) * cmask if ref is not None else torch.zeros_like(logps)
    log_ratio = (logps - old) * cmask if old is not None else torch.zeros_like(logps)
    if args.importance_sampling_level == "sequence":  # GSPO: one ratio per sequence, from the mean token log-ratio
        log_ratio = (log_ratio.sum(-1) / cmask.sum(-1).clamp(min=1))[:, None].expand_as(logps) * cmask
    ratio, high = log_ratio.exp(), args.epsilon if args.epsilon_high is None else args.epsilon_high
    adv = advantages[:, None]
    clipped = ((ratio < 1 - args.epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return torch.stack(
        [loss, kl.sum(), (clipped * cmask).sum(), -(logps * cmask).sum(), n_tokens, cmask.sum(-1).mean()]
    )


def average_stats(stats, world_size):
    """Per-update sums -> the step's means over all processes and updates."""
    loss, kl, clipped, neg_logp, n_tokens, length = all_sum(torch.stack(stats).sum(0)).tolist()
    n_updates = len(stats) * world_size
    return dict(
        loss=loss / n_updates,
        kl=kl / n_tokens,
        clip_fraction=clipped / n_tokens,
        entropy=neg_logp / n_tokens,
        completion_length=length / n_updates,
    )


def reward_stats(rewards):
    everyone = all_gather(rewards)
    return dict(reward=everyone.mean().item(), reward_std=everyone.std().item() if everyone.numel() > 1 else 0.0)


def open_completions(args, is_main):
    if not (args.log_completions and is_main):
        return None
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return open(Path(args.out_dir) / "completions.jsonl", "w")  # noqa: SIM115 (closed at the end)


def write_completions(file, step, prompts, completions, texts, rewards, advantages, group_size):
    """Rank 0's rollouts, one row per completion (its token ids too), in the order the loss saw them."""
    for i, (ids, text, reward, advantage) in enumerate(zip(completions, texts, rewards.tolist(), advantages.tolist())):
        row = dict(step=step, prompt=prompts[i // group_size], completion=text, completion_ids=ids)
        file.write(json.dumps(row | dict(reward=reward, advantage=advantage)) + "\n")
    file.flush()


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


def open_metrics(args, is_main):
    """metrics.jsonl in --out-dir, replacing an earlier run's (rank 0 writes; None elsewhere)."""
    if not is_main:
        return None
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return open(Path(args.out_dir) / "metrics.jsonl", "w")  # noqa: SIM115 (closed at the end)


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


def clip_gradients(model, args):
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    return (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: DTensor


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


def save(model, optimizer, args, rank, step, extra, log, tokenizer):
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
            "posttrain": {"method": Path(__file__).stem, "model": args.model, "init_from": args.init_from, **extra},
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


# -----------------------------------------------------------------------------
# Main


def main(argv=None):
    """Train; a user's mistake ends the run with one line (SystemExit), anything else keeps its traceback."""
    return train(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:  # a user error's one line: under torchrun, rank 0 alone prints it
        if isinstance(e.code, str) and int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(1) from None
        raise
