"""Pretrain Kimi K2 on one CPU, one GPU, or many GPUs with DDP or FSDP2 — the same file for all.

    python kimi_k2/train.py                               # tiny model, bundled Shakespeare, CPU
    python kimi_k2/train.py --preset tiny_moe             # tiny DeepSeekMoE, one expert group as K2
    torchrun --nproc_per_node 8 kimi_k2/train.py --preset kimi_k2 --parallel fsdp --data-dir data/fineweb10B
    python kimi_k2/train.py --generate --prompt "ROMEO:"  # sample from the last checkpoint

gpt2/train.py's recipe, section for section; the scale machinery is in infra.py beside it. Changes from
deepseek3/train.py: MuonClip (K2 report sec. 2.1, Algorithm 1) replaces AdamW. make_optimizer returns one
MuonWithAdamW: Muon for every hidden weight matrix (each routed expert's on its own), AdamW for the embedding,
head, norms and router weights, at the same --lr and --weight-decay; under FSDP each 2-D matrix is gathered
whole to be orthogonalised. TrainingExtras keeps DeepSeek-V3's bias balancing and adds QK-Clip: after each
step, every head whose largest pre-softmax logit of the step (S_max, max over micro-batches and ranks)
exceeded tau = 100 has its query and key weights scaled so that its logits shrink by tau / S_max.
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
PRESETS = ("tiny", "tiny_moe", "kimi_k2")

# Published recipes of the real presets: none encoded (deepseek3's names deepseek_v3, a preset K2 lacks):
# pass --lr, --warmup-steps and --total-batch-tokens for a real run.
TRAINING_DEFAULTS = {}


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
from torch.distributed.tensor import DTensor  # noqa: E402

from kimi_k2.infra import (  # noqa: E402
    Prefetcher,
    Run,
    StepFigures,
    all_mean,
    build_model,
    config_from_args,
    data_loaders,
    is_hidden_matrix,
    load_tokenizer_for,
    local_part,
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
    """MuonClip's optimizer (K2 report sec. 2.1 and Algorithm 1; Moonlight, Liu et al. 2025, sec. 2): Muon for
    every hidden weight matrix — attention projections, dense and shared MLPs, and each routed expert's
    matrices, orthogonalised one expert at a time — and AdamW for the rest: the embedding, the output head,
    norm gains and router weights. The routers' biases take no gradient (TrainingExtras.after_step moves them):
    left out of both. One optimizer object with both kinds of group, so the loop's schedule (each group's
    "lr"), clipping and checkpoints treat it as they treat AdamW; Muon's RMS matching lets both share --lr
    and --weight-decay, as K2 does. QK-Clip, the other half of MuonClip, is in TrainingExtras.after_step."""
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


# diff vs deepseek3: MuonClip's optimizer, a module-level class that make_optimizer returns
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
        with torch.no_grad():  # every layer, without reading `over` back: a head's gamma 1 leaves its rows exact
            for attn, gamma in zip(self.attentions, gammas, strict=True):
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
