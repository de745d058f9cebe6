"""YaRN context extension (Peng et al., 2023, arXiv 2309.00071): train a model at context T, set
YaRN's factor s, fine-tune briefly at s*T, save a Hugging Face checkpoint whose config.json carries
the scaling, and compare at T, 2T and 4T, as the paper's tables do:

    (a) the original model, extrapolating RoPE past T
    (b) linear position interpolation (Chen et al., 2023): position m gets the angles of m / s
    (c) YaRN without fine-tuning
    (d) YaRN fine-tuned at s*T

on validation loss and passkey retrieval (a 5-digit number hidden in filler text, asked for at the
end; the model must reproduce every digit).

    python posttrain/yarn.py --model llama31             # CPU, a few minutes
    python posttrain/yarn.py --model qwen3 --device cuda --context 1024 --n-layer 8 --n-embd 512

Any model of the registry whose Config has RoPE scaling fields (`rope_type` = "yarn") works; its
model.py does the scaling, this file only sets Config fields. The data is the bundled Shakespeare
(shared.data's corpus), read as characters: a 50K-token BPE vocabulary would make the output head
most of a CPU step, and characters make a passkey a plain copy of 5 digits. Passkey sequences
(`--passkey-frac`) are mixed into both the base training and the fine-tuning, and their answer
digits get an extra loss term (`--answer-weight`): in plain next-token loss they are 1-2% of the
tokens, and a 2-layer 64-wide model left on that signal stays at chance (ln 10 per digit) for
thousands of steps. Evaluation passkeys are numbers that no training sequence uses, hidden in
validation text.

Under torchrun (gloo on CPU, nccl on GPU) every rank draws the same batch and keeps its stride of
the rows, DDP averages the gradients, evaluation is split the same way and summed, and rank 0
writes the checkpoints:

    torchrun --nproc_per_node 2 posttrain/yarn.py --model llama31
"""

import argparse
import dataclasses
import importlib
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from posttrain.common import all_sum
from shared.data import SHAKESPEARE
from shared.models import MODELS

ROPE_MODELS = sorted({m.package for m in MODELS if "rope_type" in m.model.Config.__dataclass_fields__})
KEY_DIGITS = 5
# Keys reserved for evaluation, never drawn in training: retrieval cannot be recall of a seen number.
EVAL_KEYS = tuple(sorted(random.Random(2309_00071).sample(range(10**KEY_DIGITS), 2000)))
EVAL_KEY_SET = frozenset(EVAL_KEYS)

# -----------------------------------------------------------------------------
# The loss


def passkey_loss(logits, targets, answer, answer_weight, n_tokens, n_answer):
    """Mean next-token cross-entropy plus answer_weight times the mean over the passkey answers'
    digits (answer: a boolean mask like targets), an SFT-style term on top of language modelling.
    Sums are divided by the whole batch's counts (n_tokens, n_answer) rather than this rank's, so the
    ranks' parts add up to the one-process loss whatever share of answers each rank holds.
    logits (B, L, V); targets, answer (B, L)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
    loss = ce.sum() / n_tokens
    if answer_weight and n_answer:
        loss = loss + answer_weight * ce[answer].sum() / n_answer
    return loss


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama31", choices=ROPE_MODELS)
    p.add_argument("--context", type=int, default=64, help="T: the base model's training context (characters)")
    p.add_argument("--factor", type=float, default=4.0, help="s: YaRN's factor; fine-tuning runs at s*T")
    p.add_argument(
        "--beta-fast",
        type=float,
        default=32.0,
        help="YaRN's beta: dimensions turning more often than this over T are kept",
    )
    p.add_argument(
        "--beta-slow", type=float, default=1.0, help="YaRN's alpha: those turning less often are divided by s"
    )
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=2000, help="optimizer steps of the base training at T")
    p.add_argument("--finetune-steps", type=int, default=600, help="optimizer steps of the fine-tuning at s*T")
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step, all ranks (batch = this / length)")
    p.add_argument("--lr", type=float, default=1e-3, help="base training's peak LR")
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=1e-3,
        help="fine-tuning's peak LR: YaRN moves the positions the base's copying attention relied on,\n"
        "and at a tenth of --lr a few hundred steps do not relearn it",
    )
    p.add_argument("--passkey-frac", type=float, default=0.5, help="share of training sequences that are passkeys")
    p.add_argument(
        "--answer-weight",
        type=float,
        default=1.0,
        help="weight of the extra loss term on passkey answer digits (0: plain next-token loss)",
    )
    p.add_argument("--eval-windows", type=int, default=16, help="validation windows per length")
    p.add_argument("--passkeys", type=int, default=30, help="passkey prompts per length")
    p.add_argument("--out-dir", default="out/yarn", help="base/ and yarn/ Hugging Face checkpoints go here")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's LOCAL_RANK GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 <= args.passkey_frac <= 1:
        p.error(f"--passkey-frac must lie in [0, 1], got {args.passkey_frac}")
    if args.factor < 1:
        p.error(f"--factor must be at least 1, got {args.factor}")
    return args


# -----------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK/WORLD_SIZE; otherwise this is one process


def setup_distributed(args):
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def my_rows(n, rank, world_size):
    """This rank's stride of a batch of n rows that every rank drew alike."""
    if n < world_size:
        raise SystemExit(f"a batch of {n} sequences cannot be split over {world_size} ranks: raise --batch-tokens")
    return slice(rank, None, world_size)


# -----------------------------------------------------------------------------
# Data: characters of Shakespeare, and passkey sequences built from them


class Chars:
    def __init__(self, text):
        self.chars = sorted(set(text) | set("0123456789"))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, s):
        return [self.index[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def split_corpus(text, chars):
    ids = torch.tensor(chars.encode(text))
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]  # train, validation


def random_windows(ids, length, n, g):
    """n windows of length + 1 tokens at random offsets: (n, length + 1)."""
    starts = torch.randint(0, len(ids) - length - 1, (n,), generator=g)
    return torch.stack([ids[s : s + length + 1] for s in starts.tolist()])


def draw_key(rng, for_eval):
    if for_eval:
        return rng.choice(EVAL_KEYS)
    while (key := rng.randrange(10**KEY_DIGITS)) in EVAL_KEY_SET:
        pass
    return key


def passkey(ids, chars, length, rng, for_eval=False):
    """One passkey sequence of exactly length + 1 tokens: filler (the corpus) with the key stated in
    it and asked for at the end. Returns the tokens and where the answer's digits start. Training
    states the key anywhere, so every distance up to length is learned; evaluation (for_eval) uses
    held-out keys stated in the first half, so the answer reaches back at least length / 2 tokens
    and the 2T and 4T columns ask across distances never trained at T."""
    key = f"{draw_key(rng, for_eval):0{KEY_DIGITS}d}"
    say, ask = chars.encode(f" [pass key {key}] "), chars.encode(f" pass key? {key}")
    n_filler = length + 1 - len(say) - len(ask)
    if n_filler < 2:
        raise SystemExit(f"a context of {length} cannot hold a passkey prompt ({len(say) + len(ask)} characters)")
    start = rng.randrange(len(ids) - n_filler)
    filler = ids[start : start + n_filler].tolist()
    at = rng.randrange(max(1, n_filler // 2) if for_eval else n_filler)
    seq = filler[:at] + say + filler[at:] + ask
    return torch.tensor(seq), len(seq) - KEY_DIGITS


def batch(ids, chars, length, n, passkey_frac, g, rng):
    """(x, y, answer): (n, length) inputs, next-token targets, and the mask of targets that are
    passkey answer digits; a share of the rows are passkey sequences."""
    seqs = random_windows(ids, length, n, g)
    answer = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        if rng.random() < passkey_frac:
            seqs[i], at = passkey(ids, chars, length, rng)
            answer[i, at - 1 : at - 1 + KEY_DIGITS] = True  # target t is token t + 1
    return seqs[:, :-1], seqs[:, 1:], answer


# -----------------------------------------------------------------------------
# The four ways to run past T


def with_rope(model, **rope):
    """A copy of model whose Config has these RoPE fields (its tables recomputed by the model's own
    precompute_rope), the weights shared."""
    cfg = dataclasses.replace(model.cfg, **rope)
    new = type(model)(cfg).to(next(model.parameters()).device)
    new.load_state_dict(model.state_dict())
    return new.eval()


def yarn_fields(args):
    return dict(
        rope_type="yarn",
        rope_factor=args.factor,
        rope_original_block_size=args.context,
        rope_beta_fast=args.beta_fast,
        rope_beta_slow=args.beta_slow,
    )


def position_interpolation(model, s):
    """Linear position interpolation (Chen et al., 2023): every frequency divided by s, the same as
    position m taking the angles of m / s. Read off the model's own table, so its layout (which
    dimensions pair) stays whatever its apply_rope expects: row 1 holds cos and sin of each theta_i."""
    new = with_rope(model)
    theta = torch.atan2(new.rope_sin[1], new.rope_cos[1])  # (head_dim,), each in (0, 1]: no wrap-around
    angles = torch.outer(torch.arange(new.rope_cos.size(0), device=theta.device, dtype=torch.float32), theta / s)
    new.rope_cos, new.rope_sin = angles.cos(), angles.sin()
    return new


# -----------------------------------------------------------------------------
# Training and evaluation


def train(model, ids, chars, args, length, steps, lr, seed, log):
    """AdamW with warmup and cosine decay, on length-token sequences; DDP when under torchrun.
    Returns the model and every step's loss (the whole batch's, equal on every rank)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    n = max(1, args.batch_tokens // length)
    mine = my_rows(n, rank, world_size)
    wrapped = DistributedDataParallel(model) if dist.is_initialized() else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x, y, answer = batch(ids, chars, length, n, args.passkey_frac, g, rng)  # alike on every rank
        n_answer = int(answer.sum())
        x, y, answer = (t[mine].to(args.device) for t in (x, y, answer))
        logits, _ = wrapped(x)
        loss = passkey_loss(logits, y, answer, args.answer_weight, n * length, n_answer)
        opt.zero_grad(set_to_none=True)
        (loss * world_size).backward()  # DDP averages gradients over ranks; the ranks' losses add up
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(all_sum(loss.detach()).item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps}  loss {losses[-1]:.3f}")
    return model.eval(), losses


def strided_mean(values_of, items, device):
    """Mean of values_of(item) over items, each rank taking its stride and the sums all-reduced."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for item in items[rank::world_size]:
        total += values_of(item)
    return all_sum(total).item() / len(items)


@torch.no_grad()
def validation_loss(model, ids, length, n, device):
    windows = list(random_windows(ids, length, n, torch.Generator().manual_seed(1234)))
    return strided_mean(lambda w: model(w[None, :-1].to(device), w[None, 1:].to(device))[1], windows, device)


@torch.no_grad()
def passkey_accuracy(model, ids, chars, length, n, device):
    """Share of prompts whose answer digits are all the model's argmax (teacher-forced, which is
    greedy decoding's answer whenever that answer is right). model(idx) -> (logits, _)."""
    rng = random.Random(4321)
    prompts = [passkey(ids, chars, length, rng, for_eval=True) for _ in range(n)]

    def right(prompt):
        seq, at = prompt
        logits, _ = model(seq[None, :-1].to(device))
        guess = logits[0, at - 1 : at - 1 + KEY_DIGITS].argmax(-1).cpu()
        return float(torch.equal(guess, seq[at : at + KEY_DIGITS]))

    return strided_mean(right, prompts, device)


def evaluate(models, val, chars, args, device):
    lengths = [args.context, 2 * args.context, 4 * args.context]
    rows = {}
    for name, model in models.items():
        rows[name] = [validation_loss(model, val, L, args.eval_windows, device) for L in lengths] + [
            passkey_accuracy(model, val, chars, L, args.passkeys, device) for L in lengths
        ]
    header = " | ".join(f"loss {L}" for L in lengths) + " | " + " | ".join(f"passkey {L}" for L in lengths)
    lines = [f"| method | {header} |", "|---" * (1 + 2 * len(lengths)) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r[:3]) + " | ")
        lines[-1] += " | ".join(f"{v:.0%}" for v in r[3:]) + " |"
    return rows, "\n".join(lines)


def save(model, path, rank):
    """Rank 0 writes the Hugging Face directory; the others wait for it."""
    if rank == 0:
        model.save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# The recipe


def main(argv=None):
    """Returns the table's rows, the fine-tuned model and the training losses of both stages."""
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args)
    args.device = device

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    torch.manual_seed(args.seed)  # every rank builds the same initial model
    model_py = importlib.import_module(f"{args.model}.model")
    text = SHAKESPEARE.read_text()
    chars = Chars(text)
    train_ids, val = split_corpus(text, chars)
    T, s = args.context, args.factor
    long = int(4 * T)  # the tables reach the longest evaluation; training at T never sees past T
    cfg = model_py.Config(
        vocab_size=len(chars.chars),
        block_size=max(long, int(s * T)),
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_kv_heads=args.n_head,
        n_embd=args.n_embd,
        **({"head_dim": args.n_embd // args.n_head} if "head_dim" in model_py.Config.__dataclass_fields__ else {}),
        intermediate_size=4 * args.n_embd,
        tie_embeddings=True,
        rope_theta=10000.0,
        rope_factor=None,
    )
    model = model_py.Transformer(cfg).to(device)
    t0 = time.time()
    log(f"base training at T={T}: {model.num_params():,} parameters, {args.model}, {world_size} process(es)")
    model, base_losses = train(model, train_ids, chars, args, T, args.base_steps, args.lr, args.seed, log)
    save(model, Path(args.out_dir) / "base", rank)

    log(f"YaRN s={s:g}: fine-tuning at s*T={int(s * T)}")
    tuned = with_rope(model, **yarn_fields(args))
    tuned, tune_losses = train(
        tuned, train_ids, chars, args, int(s * T), args.finetune_steps, args.finetune_lr, args.seed + 1, log
    )
    save(tuned, Path(args.out_dir) / "yarn", rank)  # config.json: rope_parameters {rope_type: yarn, ...}

    models = {
        "(a) original, extrapolating": model,
        "(b) position interpolation": position_interpolation(model, s),
        "(c) YaRN, no fine-tuning": with_rope(model, **yarn_fields(args)),
        "(d) YaRN, fine-tuned": tuned,
    }
    rows, table = evaluate(models, val, chars, args, device)
    log(f"\n{args.model}, T={T}, s={s:g}, {world_size} process(es), {time.time() - t0:.0f} s\n{table}")
    return rows, tuned, {"base": base_losses, "finetune": tune_losses}


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
