"""Direct Preference Optimization (DPO): fit a policy to pairs of completions (chosen preferred to
rejected) without a reward model or sampling, by a logistic loss on the difference of the two
completions' log-likelihood ratios to a frozen reference model (Rafailov et al. 2023, "Direct
Preference Optimization: Your Language Model is Secretly a Reward Model", eq. 7).

Variants, selected by loss_type, as TRL's DPOTrainer (trl 1.16, trl/trainer/dpo_trainer.py) names them:
- sigmoid: the DPO loss itself, -log sigmoid(beta * margin) (Rafailov et al. eq. 7);
- hinge: the SLiC hinge, relu(1 - beta * margin) (Zhao et al. 2023, eq. 10);
- ipo: IPO's squared loss (Azar et al. 2023, eq. 17) on per-token (length-normalised) log-ratios;
- robust: the unbiased loss under label noise of rate label_smoothing (Chowdhury et al. 2024, eq. 9).

    python posttrain/dpo.py                  # from out/sft (`python posttrain/sft.py` first), CPU, a few minutes
    python posttrain/dpo.py --init-from none # a fresh small model: the pairs need no SFT
    torchrun --nproc_per_node 2 posttrain/dpo.py --parallel ddp        # or fsdp; gloo on CPU
    python posttrain/dpo.py --model llama31 --init-from path/to/hf_dir --data prefs.jsonl --device cuda

Data: TRL's standard preference format, prompt/chosen/rejected text columns in a .jsonl/.parquet file
or a hub dataset (ref_chosen_logps/ref_rejected_logps columns, as TRL's precompute_ref_logps writes
them, replace the reference model); by default pairs built from a toy task, the right answer chosen and
the answer with one word changed rejected. Logged: TRL's rewards/accuracies (the chosen completion's
implicit reward beta * log(pi/pi_ref) above the rejected one's) and rewards/margins, on the training
batch and on held-out pairs, and the greedy exact-match reward before and after.

The loss is checked against TRL's DPOTrainer on identical tensors in tests/test_posttrain_losses.py.
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

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean preference loss over a batch of B pairs.

    Every *_logps is (B,): a completion's log-probability summed over its tokens, under the policy or
    the reference. chosen_lengths / rejected_lengths (B,) count completion tokens; only 'ipo' reads
    them (required there). label_smoothing is the assumed probability that a label is flipped; only
    'robust' reads it, as in TRL 1.16, so any other loss type refuses a non-zero value.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} is not one of {DPO_LOSS_TYPES}")
    if label_smoothing != 0.0 and loss_type != "robust":
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} applies to loss_type='robust' only")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    # The implicit rewards of eq. 5 (up to beta): log pi(y|x) - log pi_ref(y|x), (B,)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)  # eq. 7
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss: loss_type='ipo' needs chosen_lengths and rejected_lengths")
        # Summed log-ratios grow with length; IPO's authors (via TRL) divide by the token count so
        # that beta (tau in eq. 17) means the same at every length. An empty completion counts as 1.
        per_token_margin = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(
            min=1
        )
        losses = (per_token_margin - 1 / (2 * beta)) ** 2  # eq. 17, tau = beta
    else:  # robust: eq. 9, the loss whose expectation under flips of rate eps is the clean loss
        eps = label_smoothing
        losses = ((1 - eps) * -F.logsigmoid(beta * margin) - eps * -F.logsigmoid(-beta * margin)) / (1 - 2 * eps)
    return losses.mean()


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
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference (tau for ipo)")
    g.add_argument("--loss-type", default="sigmoid", choices=DPO_LOSS_TYPES, help="see the module docstring")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="robust only: the assumed rate of flipped labels")
    # the SFT run's output, as DPO usually follows SFT; --init-from none trains a fresh model
    p.set_defaults(init_from="out/sft", steps=60, batch_size=32, lr=5e-4, out_dir="out/dpo")
    args = p.parse_args(argv)
    rules = [
        ("beta", lambda v: 0 < v < math.inf, "a positive number"),
        ("label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ]
    check_args(args, p, rules)
    if args.label_smoothing and args.loss_type != "robust":
        p.error(f"--label-smoothing {args.label_smoothing}: only --loss-type robust reads it")
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
# Preference pairs: TRL's standard format (prompt, chosen, rejected), or pairs built from a toy task
# (the right answer chosen, the same answer with one word changed rejected)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # the names TRL's precompute_ref_logps writes


def corrupt(answer, rng):
    """The answer with one word changed: a letter replaced by another, or a number moved by 1 or 10 within add's
    answers (the task vocabulary holds no others)."""
    words = answer.split()
    i = rng.randrange(len(words))
    if words[i].isdigit():
        moved = [int(words[i]) + d for d in (-10, -1, 1, 10)]
        words[i] = str(rng.choice([n for n in moved if 0 <= n <= 2 * max(ADDENDS)]))
    else:
        words[i] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != words[i]])
    return " " + " ".join(words)


class Preferences(Examples):
    """Training pairs and held-out pairs, each a dict with PREFERENCE_COLUMNS (and REF_COLUMNS when the
    data carries precomputed reference log-probs). The held-out prompts' chosen completions are also
    the answers of the exact-match reward measured before and after."""

    def __init__(self, args):
        if not args.data:
            super().__init__(args)
            eval_rng = random.Random(-1 - args.seed)
            self.eval_pairs = [self.toy_pair(prompt, eval_rng) for prompt in self.eval_prompts]
            return
        self.rng = random.Random(args.seed)
        rows = read_preferences(args.data)
        if len(rows) <= args.eval_prompts:
            raise SystemExit(f"--data {args.data}: {len(rows)} rows, not more than --eval-prompts")
        self.train, self.eval_pairs = rows[: -args.eval_prompts], rows[-args.eval_prompts :]
        self.eval_prompts = [row["prompt"] for row in self.eval_pairs]
        self.answers = {row["prompt"]: row["chosen"] for row in rows}
        self.reward = self.named_reward(args.reward) or load_reward(args.reward)

    def toy_pair(self, prompt, rng):
        answer = self.task.solve(prompt)
        return {"prompt": prompt, "chosen": answer, "rejected": corrupt(answer, rng)}

    def batch(self, n):
        """n pairs, none of them on a held-out prompt."""
        if hasattr(self, "train"):
            return [self.rng.choice(self.train) for _ in range(n)]
        return [self.toy_pair(self.draw_training_prompt(), self.rng) for _ in range(n)]


def read_preferences(name):
    """[{prompt, chosen, rejected[, ref_chosen_logps, ref_rejected_logps]}] from a .jsonl/.json or .parquet
    file or a hub dataset's train split, plain text (TRL's standard, not conversational, format)."""
    data = read_table(name, PREFERENCE_COLUMNS)
    refs = [c for c in REF_COLUMNS if c in data.column_names]
    if len(refs) == 1:
        raise SystemExit(f"--data {name}: has {refs[0]} but not its partner; precomputed reference log-probs need both")
    rows = data.select_columns([*PREFERENCE_COLUMNS, *refs]).to_list()
    if not all(isinstance(row[c], str) for row in rows for c in PREFERENCE_COLUMNS):
        raise SystemExit(
            f"--data {name}: prompt/chosen/rejected must be plain strings (conversational rows are not read)"
        )
    return rows


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
    examples = Preferences(args)
    if len(examples.eval_pairs) < world_size:  # every process scores a share of them in one forward
        raise SystemExit(f"--eval-prompts {args.eval_prompts}: fewer held-out pairs than the {world_size} processes")
    model, source = load_policy(args, tokenizer, log)
    check_lengths([tokenizer.encode(p) for p in examples.eval_prompts], args, model.cfg.block_size)
    # precomputed reference log-probs in the data replace the reference model
    reference = None if REF_COLUMNS[0] in examples.eval_pairs[0] else frozen_reference(model, args, device)
    wrapped = wrap_policy(model, args, device)
    optimizer = make_optimizer(model, args, device)
    log(f"policy: {source}, {model.num_params():,} parameters | {world_size} process(es), {args.parallel} | {device}")
    log(f"reference: {'the frozen initial policy' if reference else 'log-probs precomputed in --data'}")
    metrics = open_metrics(args, is_main)
    history = []

    def record(**row):
        history.append(row)
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def evaluate(step):
        held_out = report_preferences(wrapped, reference, examples, tokenizer, args, rank, world_size, device)
        log(f"step {step:4d} | held-out preference accuracy {held_out[0]:.3f} | reward margin {held_out[1]:.4f}")
        record(step=step, eval_accuracy=held_out[0], eval_margin=held_out[1])
        return (*held_out, *report_reward(model, examples, tokenizer, args, rank, world_size, step, record, log))

    before = evaluate(0)
    after, t0, tokens = before, time.perf_counter(), 0
    for step in range(args.steps):
        pairs = examples.batch(args.batch_size)[rank::world_size]  # every process draws the same global batch
        loss, chosen_rewards, rejected_rewards, n_tokens = dpo_batch(wrapped, reference, pairs, tokenizer, args, device)
        loss.backward()  # DDP and FSDP average over processes: equal shares, so the global batch mean
        grad_norm = clip_gradients(model, args)
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = all_sum(loss.detach()).item() / world_size
        if not math.isfinite(train_loss):
            raise SystemExit(f"loss is {train_loss} at step {step + 1}: stopping without saving")
        accuracy, margin = global_pair_means(chosen_rewards, rejected_rewards, world_size)
        tokens += all_sum(torch.tensor(n_tokens)).item()
        row = dict(step=step + 1, loss=train_loss, accuracy=accuracy, margin=margin, lr=lr, grad_norm=grad_norm)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            row["tokens_per_s"] = tokens / (time.perf_counter() - t0)
            log(
                f"step {step + 1:4d} | loss {train_loss:.4f} | accuracy {accuracy:.3f} | margin {margin:.4f} | "
                f"lr {lr:.2e} | grad norm {grad_norm:.3f} | {row['tokens_per_s']:,.0f} tok/s"
            )
            t0, tokens = time.perf_counter(), 0
        record(**row)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.steps:
            after = evaluate(step + 1)
    names = ("accuracy", "margin", "exact_match", "reward")
    extra = {name: {"before": b, "after": a} for name, b, a in zip(names, before, after)}
    save(model, optimizer, args, rank, step=args.steps, extra=extra, log=log, tokenizer=tokenizer)
    log(
        f"on {len(examples.eval_pairs)} held-out pairs: preference accuracy {before[0]:.3f} -> {after[0]:.3f}, "
        f"reward margin {before[1]:.4f} -> {after[1]:.4f}; exact match {before[2]:.3f} -> {after[2]:.3f}"
    )
    if metrics:
        metrics.close()
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


def dpo_batch(policy, reference, pairs, tokenizer, args, device):
    """One forward of the policy over the chosen rows then the rejected rows (B pairs -> 2B sequences),
    the reference's log-probs (its forward, or the data's), and dpo_loss. Returns the loss, the implicit
    rewards beta * (log pi - log pi_ref) of the chosen and rejected completions (B,) each, detached, and
    the number of tokens."""
    prompts, chosen = encode_pairs(tokenizer, [(pair["prompt"], pair["chosen"]) for pair in pairs])
    _, rejected = encode_pairs(tokenizer, [(pair["prompt"], pair["rejected"]) for pair in pairs])
    ids, mask = collate(prompts + prompts, chosen + rejected, tokenizer.eot_id, device)  # (2B, L)
    block_size = (policy.module if hasattr(policy, "module") else policy).cfg.block_size
    if ids.size(1) - 1 > block_size:
        raise SystemExit(f"a prompt + completion of {ids.size(1)} tokens exceeds the policy's block_size {block_size}")
    logps = sequence_logps(policy, ids, mask).sum(dim=1)  # (2B,) summed over each completion's tokens
    if reference is None:
        ref_logps = torch.tensor([pair[c] for c in REF_COLUMNS for pair in pairs], device=device)
    else:
        with torch.no_grad():
            ref_logps = sequence_logps(reference, ids, mask).sum(dim=1)
    (chosen_logps, rejected_logps), (ref_chosen, ref_rejected) = logps.chunk(2), ref_logps.chunk(2)
    lengths = mask.sum(dim=1)
    loss = dpo_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen,
        ref_rejected,
        beta=args.beta,
        loss_type=args.loss_type,
        label_smoothing=args.label_smoothing,
        chosen_lengths=lengths[: len(pairs)],
        rejected_lengths=lengths[len(pairs) :],
    )
    rewards = args.beta * (logps.detach() - ref_logps)  # the implicit reward of DPO eq. 5, up to a constant
    return loss, *rewards.chunk(2), ids.numel()


def global_pair_means(chosen_rewards, rejected_rewards, world_size):
    """(preference accuracy, mean reward margin) over the pairs of all processes (equal shares), TRL's
    rewards/accuracies (chosen's reward strictly higher) and rewards/margins."""
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    margin = (chosen_rewards - rejected_rewards).float().mean()
    means = all_sum(torch.stack([accuracy, margin])) / world_size
    return means[0].item(), means[1].item()


@torch.no_grad()
def report_preferences(wrapped, reference, examples, tokenizer, args, rank, world_size, device):
    """(accuracy, margin) on the held-out pairs, each process scoring its share in one forward."""
    pairs = examples.eval_pairs[rank::world_size]
    wrapped.eval()
    _, chosen_rewards, rejected_rewards, _ = dpo_batch(wrapped, reference, pairs, tokenizer, args, device)
    wrapped.train()
    counts = all_sum(
        torch.stack(
            [
                (chosen_rewards > rejected_rewards).double().sum(),
                (chosen_rewards - rejected_rewards).double().sum(),
            ]
        )
    )
    return counts[0].item() / len(examples.eval_pairs), counts[1].item() / len(examples.eval_pairs)


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
