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
most of a CPU step, and characters make a passkey a plain copy of 5 digits. The passkey is made
learnable by mixing passkey sequences (`--passkey-frac`) into both the base training and the
fine-tuning; a model trained without them never learns to answer, at any length.
"""

import argparse
import dataclasses
import importlib
import math
import random
import time
from pathlib import Path

import torch

from shared.data import SHAKESPEARE
from tests.registry import MODELS

ROPE_MODELS = sorted({m.package for m in MODELS if "rope_type" in m.model.Config.__dataclass_fields__})

# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama31", choices=ROPE_MODELS)
    p.add_argument("--context", type=int, default=64, help="T: the base model's training context (characters)")
    p.add_argument("--factor", type=float, default=4.0, help="s: YaRN's factor; fine-tuning runs at s*T")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=600, help="optimizer steps of the base training at T")
    p.add_argument("--finetune-steps", type=int, default=100, help="optimizer steps of the fine-tuning at s*T")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per step (batch = this / context)")
    p.add_argument("--lr", type=float, default=3e-3, help="base training's peak LR; fine-tuning uses a tenth")
    p.add_argument("--passkey-frac", type=float, default=0.25, help="share of training sequences that are passkeys")
    p.add_argument("--eval-windows", type=int, default=16, help="validation windows per length")
    p.add_argument("--passkeys", type=int, default=30, help="passkey prompts per length")
    p.add_argument("--out-dir", default="out/yarn", help="base/ and yarn/ Hugging Face checkpoints go here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Data: characters of Shakespeare, and passkey sequences built from them


class Chars:
    def __init__(self, text):
        self.chars = sorted(set(text) | set("0123456789"))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, s):
        return [self.index[c] for c in s]


def split_corpus(text, chars):
    ids = torch.tensor(chars.encode(text))
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]  # train, validation


def random_windows(ids, length, n, g):
    """n windows of length + 1 tokens at random offsets: (n, length + 1)."""
    starts = torch.randint(0, len(ids) - length - 1, (n,), generator=g)
    return torch.stack([ids[s : s + length + 1] for s in starts.tolist()])


def passkey(ids, chars, length, rng):
    """One passkey sequence of exactly length + 1 tokens: filler (the corpus) with the key stated
    somewhere in its first half and asked for at the end. Returns the tokens and where the
    answer's 5 digits start."""
    key = f"{rng.randrange(10**5):05d}"
    say, ask = chars.encode(f" [pass key {key}] "), chars.encode(f" pass key? {key}")
    n_filler = length + 1 - len(say) - len(ask)
    if n_filler < 2:
        raise SystemExit(f"a context of {length} cannot hold a passkey prompt ({len(say) + len(ask)} characters)")
    start = rng.randrange(len(ids) - n_filler)
    filler = ids[start : start + n_filler].tolist()
    at = rng.randrange(max(1, n_filler // 2))
    seq = filler[:at] + say + filler[at:] + ask
    return torch.tensor(seq), len(seq) - 5


def batch(ids, chars, length, n, passkey_frac, g, rng):
    """(x, y): (n, length) inputs and next-token targets, a share of them passkey sequences."""
    seqs = random_windows(ids, length, n, g)
    for i in range(n):
        if rng.random() < passkey_frac:
            seqs[i] = passkey(ids, chars, length, rng)[0]
    return seqs[:, :-1], seqs[:, 1:]


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
    return dict(rope_type="yarn", rope_factor=args.factor, rope_original_block_size=args.context)


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


def train(model, ids, chars, args, length, steps, lr, seed):
    """AdamW with warmup and cosine decay, on length-token sequences."""
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    n = max(1, args.batch_tokens // length)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x, y = batch(ids, chars, length, n, args.passkey_frac, g, rng)
        _, loss = model(x.to(args.device), y.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  step {step:5d}/{steps}  loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def validation_loss(model, ids, length, n, device):
    windows = random_windows(ids, length, n, torch.Generator().manual_seed(1234))
    losses = [model(w[None, :-1].to(device), w[None, 1:].to(device))[1].item() for w in windows]
    return sum(losses) / len(losses)


@torch.no_grad()
def passkey_accuracy(model, ids, chars, length, n, device):
    """Share of prompts whose 5 answer digits are all the model's argmax (teacher-forced, which is
    greedy decoding's answer whenever that answer is right)."""
    rng, right = random.Random(4321), 0
    for _ in range(n):
        seq, at = passkey(ids, chars, length, rng)
        logits, _ = model(seq[None, :-1].to(device))
        right += bool((logits[0, at - 1 : at + 4].argmax(-1).cpu() == seq[at : at + 5]).all())
    return right / n


def evaluate(models, val, chars, args):
    lengths = [args.context, 2 * args.context, 4 * args.context]
    rows = {}
    for name, model in models.items():
        rows[name] = [validation_loss(model, val, L, args.eval_windows, args.device) for L in lengths] + [
            passkey_accuracy(model, val, chars, L, args.passkeys, args.device) for L in lengths
        ]
    header = " | ".join(f"loss {L}" for L in lengths) + " | " + " | ".join(f"passkey {L}" for L in lengths)
    lines = [f"| method | {header} |", "|---" * (1 + 2 * len(lengths)) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r[:3]) + " | ")
        lines[-1] += " | ".join(f"{v:.0%}" for v in r[3:]) + " |"
    return rows, "\n".join(lines)


# -----------------------------------------------------------------------------
# The recipe


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
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
    model = model_py.Transformer(cfg).to(args.device)
    t0 = time.time()
    print(f"base training at T={T}: {model.num_params():,} parameters, {args.model}")
    train(model, train_ids, chars, args, T, args.base_steps, args.lr, args.seed)
    model.save_pretrained(Path(args.out_dir) / "base")

    print(f"YaRN s={s:g}: fine-tuning at s*T={int(s * T)}")
    tuned = with_rope(model, **yarn_fields(args))
    train(tuned, train_ids, chars, args, int(s * T), args.finetune_steps, args.lr / 10, args.seed + 1)
    tuned.save_pretrained(Path(args.out_dir) / "yarn")  # config.json: rope_parameters {rope_type: yarn, ...}

    models = {
        "(a) original, extrapolating": model,
        "(b) position interpolation": position_interpolation(model, s),
        "(c) YaRN, no fine-tuning": with_rope(model, **yarn_fields(args)),
        "(d) YaRN, fine-tuned": tuned,
    }
    rows, table = evaluate(models, val, chars, args)
    print(f"\n{args.model}, T={T}, s={s:g}, {time.time() - t0:.0f} s\n{table}")
    return rows, tuned


if __name__ == "__main__":
    main()
