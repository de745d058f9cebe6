"""MuonClip's optimizer step against AdamW's, on Kimi K2's model (kimi_k2/train.py's make_optimizer).

    uv run python -m bench.muon                        # tiny preset, CPU, fp32, 1 thread, ~1 min
    uv run python -m bench.muon --preset tiny_moe      # with routed experts (a batch of matrices per layer)
    uv run python -m bench.muon --device cuda --preset tiny_moe
    uv run python -m bench.muon --quick                # a few-second smoke run

Each optimizer gets its own copy of the same model and the same gradients (from one forward and
backward on random tokens), then steps repeatedly, the two in turn (A B A B ...), and medians are
compared. Muon's step runs 5 Newton-Schulz iterations, three matrix products each, on every hidden
matrix, where AdamW does a few elementwise operations per parameter; the embedding and head stay on
AdamW in both. For scale the time of one forward and backward of the same batch is printed beside
them. QK-Clip adds nothing to the step unless a head's logit passes tau; the S_max statistic costs
one extra q k^T per layer in the training forward (included in the forward+backward time).
Beside the timings, a check that the Muon being timed is K2's: one step's update of each Muon matrix (weight
decay taken out) has an RMS of about 0.2 lr, the RMS matching that lets Muon share AdamW's lr (Moonlight eq. 4).
"""

import argparse
import copy
import statistics
from argparse import Namespace

import torch

from bench.common import interleaved, placement, ratio_spread, setup
from kimi_k2.model import Config, Transformer
from kimi_k2.train import make_optimizer

QUICK = dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, intermediate_size=128)
# one setting for both: K2's Muon reuses AdamW's lr and weight decay through its RMS matching
OPTIMIZER_ARGS = Namespace(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=Config.PRESETS)
    p.add_argument("--quick", action="store_true", help="a few-second smoke run on a toy config")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer (after a warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 is torch's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 3
    return args


def adamw(model, args, device):
    """deepseek3/train.py's optimizer: AdamW on everything, matrices decayed."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")


def copy_with_gradients(model):
    """A deep copy of model holding clones of its gradients (deepcopy leaves a Parameter's .grad behind)."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def muon_update_rms(model, args, device):
    """Per Muon matrix (each expert its own), RMS of one step's update over lr, on a copy of model holding its
    gradients; W (1 - lr wd) is the decay part of the step, taken out. About 0.2: Newton-Schulz's singular
    values land near, not at, 1."""
    optimizer = make_optimizer(copy_with_gradients(model), args, device)
    matrices = [p for g in optimizer.param_groups if g["muon"] for p in g["params"]]
    before = [p.detach().clone() for p in matrices]
    optimizer.step()
    decay = 1 - args.lr * args.weight_decay
    updates = [(p - w * decay).reshape(-1, *p.shape[-2:]) for p, w in zip(matrices, before, strict=True)]
    return torch.cat([u.square().mean(dim=(-2, -1)).sqrt() / args.lr for u in updates])  # (matrices,)


def main(argv=None):
    args = parse_args(argv)
    device = setup(args)
    cfg = Config.from_preset(args.preset, **(QUICK if args.quick else {}))
    model = Transformer(cfg).to(device)
    idx = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, idx, aux={})
        loss.backward()

    forward_backward()
    rms = muon_update_rms(model, OPTIMIZER_ARGS, device)
    # the same gradients, kept for every step
    copies = {"muon": copy_with_gradients(model), "adamw": copy_with_gradients(model)}
    optimizers = {
        "muon": make_optimizer(copies["muon"], OPTIMIZER_ARGS, device),
        "adamw": adamw(copies["adamw"], OPTIMIZER_ARGS, device),
    }
    muon_params = sum(p.numel() for g in optimizers["muon"].param_groups if g["muon"] for p in g["params"])
    times = interleaved({name: opt.step for name, opt in optimizers.items()}, args.repeats, device=device)
    times["forward+backward"] = interleaved({"fb": forward_backward}, args.repeats, device=device)["fb"]

    print(
        f"kimi_k2 {args.preset}: {model.num_params():,} params, {muon_params:,} of them on Muon; {placement(model, device)}"
    )
    for name, ts in times.items():
        print(f"{name:>16}: {1e3 * statistics.median(ts):8.2f} ms")
    ratio = statistics.median(times["muon"]) / statistics.median(times["adamw"])
    q1, _, q3 = ratio_spread(times["muon"], times["adamw"])
    print(f"Muon step / AdamW step: {ratio:.2f}x (per-repetition ratios p25 {q1:.2f}x .. p75 {q3:.2f}x)")
    share = statistics.median(times["muon"]) / statistics.median(times["forward+backward"])
    print(f"Muon step / forward+backward: {share:.2f}x")
    low, high = rms.min().item(), rms.max().item()
    print(f"Muon update RMS / lr over {rms.numel()} matrices: {low:.3f} .. {high:.3f} (Moonlight eq. 4: 0.2)")
    return ratio


if __name__ == "__main__":
    main()
