"""Proximal Policy Optimization (PPO) for language models, as in RLHF: sample completions, score each
with a reward, turn the score into per-token rewards shaped by a KL penalty to the frozen reference
policy (Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
eq. 2; Ziegler et al. 2019), estimate advantages with a learned value head and GAE (Schulman et al.
2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16), then run
several epochs of the clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms", eq. 7) and a clipped value loss on minibatches.

    python posttrain/ppo.py                  # from out/sft (`python posttrain/sft.py` first), CPU, a few minutes
    torchrun --nproc_per_node 2 posttrain/ppo.py --parallel ddp        # or fsdp; gloo on CPU
    python posttrain/ppo.py --model llama31 --init-from path/to/hf_dir --device cuda

Conventions are those of TRL's PPOTrainer (trl 1.12, trl/experimental/ppo/ppo_trainer.py; PPO left
TRL in 1.13): the score lands on the position after the last completion token (where the value head
sees the finished sequence), whitening uses the unbiased variance, returns come from the unwhitened
advantages, losses are token means, the value loss is 0.5 x the clipped squared error, and the
value-side tensors cover one more position than the completion (TRL's padding_mask_p1). Checked in
tests/test_posttrain_losses.py.
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

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over the positions where mask is 1."""
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8), mean and unbiased variance over the masked positions.

    shift_mean=False adds the mean back (rescale only). Every position is transformed; callers zero
    the padding themselves.
    """
    count = mask.sum()
    if count < 2:
        raise ValueError(f"masked_whiten: needs at least 2 masked values for an unbiased variance, got {int(count)}")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask) * count / (count - 1)  # Bessel's correction
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each right-padded row's last completion token (-1 for an empty row)."""
    return mask.sum(dim=1).long() - 1


def value_mask(mask: torch.Tensor) -> torch.Tensor:
    """The completion mask extended by one position: the value of the finished sequence, where the
    score is paid, is trained too (TRL's padding_mask_p1)."""
    positions = torch.arange(mask.size(1), device=mask.device)
    return (positions <= last_token_index(mask).unsqueeze(1) + 1).to(mask.dtype)


def ppo_token_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """(B, T) rewards: -kl_coef x KL(pi || pi_ref) per completion token (InstructGPT eq. 2's penalty,
    spread over tokens), plus each sequence's score (B,) on the position after its last token, or on
    the last token itself when the completion fills all T positions.

    k1 estimates KL by log pi - log pi_ref; k3 by exp(r) - 1 - r with r = log pi_ref - log pi (unbiased
    and never negative, http://joschu.net/blog/kl-approx.html).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"ppo_token_rewards: kl_estimator {kl_estimator!r} is not one of {KL_ESTIMATORS}")
    log_ratio = ref_logps - logps  # (B, T)
    kl = -log_ratio if kl_estimator == "k1" else torch.expm1(log_ratio) - log_ratio
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    score_position = torch.where(last + 1 < mask.size(1), last + 1, last)
    rows = torch.arange(mask.size(0), device=mask.device)
    rewards[rows, score_position] += scores
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (GAE eq. 16) over (B, T) rewards and value predictions.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1}, with V = 0 past the value
    mask and past T. Returns (advantages, returns): returns = A + V from the unwhitened A (the value
    head's regression target); the advantages are then whitened over the completion tokens (if whiten)
    and zeroed on padding.
    """
    values = values * value_mask(mask)
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    returns = advantages + values
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages * mask, returns


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> torch.Tensor:
    """PPO's clipped surrogate (eq. 7), negated for descent, averaged over completion tokens."""
    ratio = torch.exp(logps - old_logps)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> torch.Tensor:
    """0.5 x the larger of the squared errors of the new value and of the new value clipped to within
    cliprange_value of the old one, averaged over the value mask (mask plus one position)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    squared_error = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(squared_error, value_mask(mask))


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
    g = p.add_argument_group("PPO")
    g.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout batch (TRL's num_ppo_epochs)")
    g.add_argument(
        "--minibatches", type=int, default=4, help="updates per pass: the batch is shuffled and cut into this many"
    )
    g.add_argument("--kl-coef", type=float, default=0.05, help="per-token KL penalty to the frozen initial policy")
    g.add_argument("--kl-estimator", default="k1", choices=("k1", "k3"), help="k1: log-ratio; k3: unbiased, >= 0")
    g.add_argument("--cliprange", type=float, default=0.2, help="epsilon of the clipped policy ratio")
    g.add_argument("--cliprange-value", type=float, default=0.2, help="how far a value may move from its rollout's")
    g.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss beside the policy loss")
    g.add_argument("--gamma", type=float, default=1.0, help="discount (1: the score counts wholly at every token)")
    g.add_argument(
        "--lam",
        type=float,
        default=1.0,
        help="GAE's lambda: bias (0) to variance (1); 1, the sampled return less the value: the value head "
        "starts at zero, and a lower lambda would lean on its early guesses (TRL: 0.95)",
    )
    # the SFT run's output: PPO needs a policy whose samples already earn some reward
    p.set_defaults(init_from="out/sft", steps=250, batch_size=128, lr=1e-3, reward="partial", out_dir="out/ppo")
    args = p.parse_args(argv)
    rules = [
        ("ppo_epochs", lambda v: v >= 0, "0 or more"),
        ("minibatches", lambda v: v >= 1, "at least 1"),
        ("kl_coef cliprange cliprange_value vf_coef", lambda v: 0 <= v < math.inf, "0 or more"),
        ("gamma lam", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ]
    check_args(args, p, rules)
    if args.batch_size % args.minibatches:
        p.error(f"--batch-size {args.batch_size} does not split into --minibatches {args.minibatches}")
    # the ratios and the KL use the policy's own log-probs (sequence_logps): the samples must come from it
    if args.temperature != 1.0 or args.top_k is not None:
        p.error("PPO samples from the policy itself: leave --temperature at 1 and --top-k unset")
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
    if (args.batch_size // args.minibatches) % world_size:
        raise SystemExit(
            f"a minibatch of {args.batch_size // args.minibatches} sequences does not split over {world_size} processes"
        )
    tokenizer = open_tokenizer(args)
    examples = Examples(args)
    model, source = load_policy(args, tokenizer, log)
    check_lengths([tokenizer.encode(p) for p in examples.eval_prompts], args, model.cfg.block_size)
    reference = frozen_reference(model, args, device) if args.kl_coef > 0 else None
    value_head = ValueHead(model.cfg.n_embd).to(device)
    wrapped = wrap_policy(model, args, device)
    optimizer = make_optimizer(model, args, device)
    value_optimizer = torch.optim.AdamW(value_head.parameters(), lr=args.lr, betas=(0.9, 0.95))
    log(
        f"policy: {source}, {model.num_params():,} parameters + a value head | {world_size} process(es), "
        f"{args.parallel} | {device} | {args.batch_size} completions per step, {args.ppo_epochs} epoch(s) x "
        f"{args.minibatches} minibatch(es)"
    )
    metrics = open_metrics(args, is_main)
    history = []

    def record(**row):
        history.append(row)
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    before = report_reward(model, examples, tokenizer, args, rank, world_size, 0, record, log)
    after, t0, tokens = before, time.perf_counter(), 0
    for step in range(args.steps):
        # every process draws the same global prompts and samples its share: prompt j goes to rank j % world
        prompts = [prompt for prompt, _ in examples.batch(args.batch_size)][rank::world_size]
        first = [rank + j * world_size for j in range(len(prompts))]  # each prompt's global index
        ids, mask, scores = rollout_batch(model, examples, tokenizer, prompts, first, step, args, device)
        batch = score_rollouts(wrapped, model, value_head, reference, ids, mask, scores, args)
        lr = lr_at(step, args)
        for opt in (optimizer, value_optimizer):
            for group in opt.param_groups:
                group["lr"] = lr
        stats = []
        for epoch in range(args.ppo_epochs):
            for rows in minibatches(args, step, epoch):
                stats.append(ppo_update(wrapped, model, value_head, batch, rows, rank, world_size, args))
                grad_norm = clip_gradients(model, args)
                for opt in (optimizer, value_optimizer):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        row = dict(step=step + 1, lr=lr, **rollout_stats(batch), **average_update_stats(stats))
        if stats:
            row["grad_norm"] = grad_norm
        if not all(math.isfinite(v) for v in row.values()):
            raise SystemExit(f"a non-finite loss or statistic at step {step + 1}: stopping without saving")
        tokens += batch["ids"].numel()  # every process holds the whole batch: this is the global count
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            row["tokens_per_s"] = tokens / (time.perf_counter() - t0)
            log(
                f"step {step + 1:4d} | reward {row['reward']:.3f} +- {row['reward_std']:.3f} | "
                f"policy loss {row.get('policy_loss', 0):.4f} | value loss {row.get('value_loss', 0):.4f} | "
                f"kl {row['kl']:.4f} | clip {row.get('clip_fraction', 0):.3f} | entropy {row['entropy']:.3f} | "
                f"length {row['completion_length']:.2f} | {row['tokens_per_s']:,.0f} tok/s"
            )
            t0, tokens = time.perf_counter(), 0
        record(**row)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.steps:
            after = report_reward(model, examples, tokenizer, args, rank, world_size, step + 1, record, log)
    extra = {name: {"before": b, "after": a} for name, b, a in zip(("exact_match", "reward"), before, after)}
    save(model, optimizer, args, rank, step=args.steps, extra=extra, log=log, tokenizer=tokenizer)
    save_value_head(value_head, args, rank)
    log(
        f"on {len(examples.eval_prompts)} held-out prompts: exact match {before[0]:.3f} -> {after[0]:.3f}, "
        f"reward ({args.reward}) {before[1]:.3f} -> {after[1]:.3f}"
    )
    if metrics:
        metrics.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return history


class ValueHead(torch.nn.Module):
    """V(s): a scalar from the policy's final hidden state (after its last norm), one per position. It shares
    the policy's trunk (one model, two heads), as InstructGPT's value function is a copy of the reward model
    and TRL's a separate network initialised from it: sharing halves the memory and the forwards, at the
    cost of the value loss also moving the trunk (--vf-coef weighs it). Zero at first: no reward model to
    start from, and a random head would only add noise to the first advantages."""

    def __init__(self, n_embd):
        super().__init__()
        self.proj = torch.nn.Linear(n_embd, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden):
        return self.proj(hidden.float()).squeeze(-1)  # (B, L-1, n_embd) -> (B, L-1)


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


def logps_and_values(wrapped, model, value_head, ids, mask):
    """One forward of the policy -> the sampled tokens' log-probs (B, L) (0 where mask is 0) and the value
    (B, L) of the state each token was drawn in (the hidden state one position earlier, as the logits).

    The hidden states come from a forward hook on the model's final norm: the models' forward returns
    logits only, and a hook reads what it computes anyway without touching model.py or running the
    blocks a second time. It sees the same tensor under DDP and FSDP (both call the module's forward)."""
    captured = {}
    handle = model.norm.register_forward_hook(lambda module, inputs, output: captured.update(hidden=output))
    try:
        logps = sequence_logps(wrapped, ids, mask)
    finally:
        handle.remove()
    values = F.pad(value_head(captured["hidden"]), (1, 0))  # (B, L): position 0 is never a completion token
    return logps, values


def rollout_batch(model, examples, tokenizer, prompts, first, step, args, device):
    """One sampled completion per prompt -> ids (n, L), mask (n, L) and the scores (n,). Every process's
    ids have the same L, with at least one padding column after the longest completion: the value of
    the state after a completion's last token is read there. Prompt j draws from its own seed, a
    function of the run's seed, the step and j's global index: the same samples on any number of processes."""
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    seeds = [args.seed * 1_000_003 + step * 10_007 * args.batch_size + j for j in first]
    model.eval()
    completions = generate(
        model, prompt_ids, args.max_new_tokens, tokenizer.eot_id, args.temperature, args.top_k, seeds=seeds
    )
    model.train()
    texts = [tokenizer.decode([t for t in c if t != tokenizer.eot_id]) for c in completions]
    scores = torch.tensor(examples.reward(prompts, texts), dtype=torch.float32, device=device)
    ids, mask = collate(prompt_ids, completions, tokenizer.eot_id, device)
    width = all_max(ids.size(1)) + 1
    ids = F.pad(ids, (0, width - ids.size(1)), value=tokenizer.eot_id)
    return ids, F.pad(mask, (0, width - mask.size(1))), scores


@torch.no_grad()
def score_rollouts(wrapped, model, value_head, reference, ids, mask, scores, args):
    """The rollout policy's log-probs and values, the reference's log-probs, the KL-shaped token rewards,
    and GAE's advantages and returns, all fixed through the updates. Each process computes its rows,
    then every process gathers the whole batch (rows in global order): the advantages are whitened over
    all of it, and any minibatch can be cut from it, as in one process.

    Layout (TRL's): (B, T+1), each completion from column 0; cmask marks its tokens. One column more
    than the longest completion, so that every score lands after its completion's last token, where
    the value head has seen the whole sequence (TRL's width, the longest completion, puts the longest
    rows' score on their last token instead)."""
    logps, values = logps_and_values(wrapped, model, value_head, ids, mask)
    ref_logps = sequence_logps(reference, ids, mask) if reference is not None else logps
    ids, mask, logps, values, ref_logps, scores = map(gather_rows, (ids, mask, logps, values, ref_logps, scores))
    mask_p1 = (mask + F.pad(mask[:, :-1], (1, 0))).clamp(max=1.0)  # (B, L): one more position per row
    cmask = completion_part(mask, mask_p1)  # (B, T+1)
    old_logps, ref = completion_part(logps, mask_p1), completion_part(ref_logps, mask_p1)
    old_values = completion_part(values, mask_p1)
    rewards = ppo_token_rewards(old_logps, ref, scores, cmask, args.kl_coef, args.kl_estimator)
    advantages, returns = gae(rewards, old_values, cmask, args.gamma, args.lam)
    return dict(
        ids=ids, mask=mask, mask_p1=mask_p1, cmask=cmask, old_logps=old_logps, ref_logps=ref,
        old_values=old_values, scores=scores, rewards=rewards, advantages=advantages, returns=returns,
    )  # fmt: skip


def minibatches(args, step, epoch):
    """The epoch's shuffle of the global batch (the same on every process), cut into --minibatches."""
    order = torch.randperm(args.batch_size, generator=torch.Generator().manual_seed(args.seed + 7919 * step + epoch))
    return order.view(args.minibatches, -1)


def ppo_update(wrapped, model, value_head, batch, rows, rank, world_size, args):
    """Backward of the clipped policy loss + vf_coef x the clipped value loss on this process's share of
    the minibatch `rows`, each loss weighted by the share's part of the minibatch's tokens, so that the
    processes' gradients average to the minibatch's token means in one process. Returns the minibatch's
    statistics (policy loss, value loss, clipped tokens, tokens), summed over processes."""
    mine = rows[rank::world_size]
    logps, values = logps_and_values(wrapped, model, value_head, batch["ids"][mine], batch["mask"][mine])
    mask_p1 = batch["mask_p1"][mine]
    logps, values = completion_part(logps, mask_p1), completion_part(values, mask_p1)  # (b, t+1)
    # the batch's (B, T+1) tensors, cut to these rows and to the t+1 columns they fill
    cmask, old_logps, old_values, advantages, returns = (
        batch[k][mine, : logps.size(1)] for k in ("cmask", "old_logps", "old_values", "advantages", "returns")
    )
    policy_loss = ppo_policy_loss(logps, old_logps, advantages, cmask, args.cliprange)
    value_loss = ppo_value_loss(values, old_values, returns, cmask, args.cliprange_value)
    policy_loss = policy_loss * cmask.sum() / batch["cmask"][rows].sum()
    value_loss = value_loss * value_mask(cmask).sum() / value_mask(batch["cmask"][rows]).sum()
    loss = policy_loss + args.vf_coef * value_loss
    (loss * world_size).backward()  # DDP and FSDP average gradients over processes; the loss is a global sum
    for p in value_head.parameters():  # the value head is not wrapped: average its gradients here
        p.grad = all_sum(p.grad) / world_size
    with torch.no_grad():  # TRL's clip fraction: tokens whose clipped term is the larger loss
        ratio = torch.exp(logps - old_logps)
        clipped = advantages * ratio.clamp(1 - args.cliprange, 1 + args.cliprange) < advantages * ratio
        stats = torch.stack([policy_loss, value_loss, (clipped * cmask).sum(), cmask.sum()]).detach()
    return all_sum(stats)


def all_max(n):
    """The largest of the processes' integers n."""
    if not dist.is_initialized():
        return n
    x = torch.tensor(n)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x)


def gather_rows(x):
    """The processes' equal-sized x (n, ...) -> the whole batch (world x n, ...) in global row order: row j
    of process r is the batch's row j x world + r, as the prompts were dealt."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)  # (n, world, ...) -> (n x world, ...)


@torch.no_grad()
def rollout_stats(batch):
    """The rollout batch's score mean/std, KL to the reference (k1, summed over each completion), entropy
    (estimated by the sampled tokens' -log p, per token) and completion length."""
    cmask, scores = batch["cmask"], batch["scores"]
    kl = ((batch["old_logps"] - batch["ref_logps"]) * cmask).sum(1).mean()
    return dict(
        reward=scores.mean().item(),
        reward_std=scores.std().item() if scores.numel() > 1 else 0.0,
        kl=kl.item(),
        entropy=(-(batch["old_logps"] * cmask).sum() / cmask.sum()).item(),
        completion_length=cmask.sum(1).mean().item(),
    )


def average_update_stats(stats):
    """Per-minibatch sums over processes -> means over the step's updates (nothing when there were none)."""
    if not stats:
        return {}
    policy_loss, value_loss, clipped, n_tokens = torch.stack(stats).sum(0).tolist()
    return dict(
        policy_loss=policy_loss / len(stats), value_loss=value_loss / len(stats), clip_fraction=clipped / n_tokens
    )


def save_value_head(value_head, args, rank):
    """value_head.pt beside ckpt.pt: the policy's checkpoint stays the plain model train.py reads."""
    if rank == 0:
        write_file(Path(args.out_dir) / "value_head.pt", value_head.state_dict())


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
