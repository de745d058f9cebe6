"""The memory plan of every real preset, as train.py's start-up log would print it, in a markdown
table for the README: FSDP over 8 GPUs of 80 GB, bf16, one sequence of up to 8,192 tokens per
micro-batch, with and without --activation-checkpointing. Models are built on the meta device:
nothing is allocated, so this runs in seconds on a laptop.

    python -m bench.memory_plan                 # 8 x 80 GB (an H100 80GB reports 79.6 GiB)
    python -m bench.memory_plan --gpus 8 --gib 139.8 --seq-len 4096

A preset that does not fit on one node is given the number of such nodes that it would fit on.
"""

import argparse
import math
from types import SimpleNamespace

import torch

from shared.models import MODELS

GIB = 2**30
MAX_NODES = 64  # 512 GPUs: past this the table says FSDP alone will not do


def plan(spec, model, world_size, seq_len, checkpointing):
    args = SimpleNamespace(parallel="fsdp", batch_size=1, seq_len=seq_len, activation_checkpointing=checkpointing)
    return spec.infra.memory_plan(model, args, world_size, torch.bfloat16)


def nodes_needed(spec, model, gpus, capacity, seq_len):
    """Fewest nodes of `gpus` GPUs on which the checkpointed run fits; None past MAX_NODES."""
    for nodes in range(1, MAX_NODES + 1):
        if sum(plan(spec, model, nodes * gpus, seq_len, True).values()) <= capacity:
            return nodes
    return None


def rows(gpus, max_seq_len):
    """(spec, preset, meta model, seq_len, plan without, plan with activation checkpointing) per real preset."""
    packages = dict.fromkeys(spec.package for spec in MODELS)  # each model once, not its test variants
    for package in packages:
        spec = next(s for s in MODELS if s.package == package)
        for preset in spec.model.Config.PRESETS:
            if preset.startswith("tiny"):
                continue
            cfg = spec.model.Config.from_preset(preset)
            seq_len = min(max_seq_len, cfg.block_size)
            with torch.device("meta"):
                model = spec.model.Transformer(cfg)
            full, ckpt = (plan(spec, model, gpus, seq_len, checkpointing) for checkpointing in (False, True))
            yield spec, preset, model, seq_len, full, ckpt


def verdict(spec, model, full, ckpt, gpus, capacity, seq_len):
    if sum(full.values()) <= capacity:
        return "yes"
    if sum(ckpt.values()) <= capacity:
        return "with --activation-checkpointing"
    nodes = nodes_needed(spec, model, gpus, capacity, seq_len)
    if nodes:
        return f"no: {nodes} nodes of {gpus} (FSDP over {nodes * gpus} GPUs, with checkpointing)"
    unsharded = ckpt["transient"] + ckpt["activations"]  # what more GPUs do not shrink
    return f"no, not with FSDP alone: {unsharded / GIB:.0f} GiB per GPU do not shrink with more GPUs"


def gib(n):
    return f"{n / GIB:.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node, all FSDP shards (default 8)")
    p.add_argument("--gib", type=float, default=79.6, help="memory of one GPU in GiB (default 79.6: H100 80GB)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per micro-batch, capped at block_size")
    args = p.parse_args(argv)
    if args.gpus < 1 or not 0 < args.gib < math.inf or args.seq_len < 1:
        p.error("--gpus and --seq-len must be at least 1, --gib a positive number")
    capacity = args.gib * GIB
    print(f"Per GPU, FSDP over {args.gpus} GPUs of {args.gib:g} GiB, bf16, batch 1 (GiB; train.py's estimate;")
    print("in brackets: with --activation-checkpointing):\n")
    print(
        "| preset | parameters | seq | weights | grads | optimizer | transient | activations | total | fits on one node |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for spec, preset, model, seq_len, full, ckpt in rows(args.gpus, args.seq_len):
        print(
            f"| {spec.package} {preset} | {model.num_params() / 1e9:.2f}B | {seq_len} | {gib(full['weights'])} | "
            f"{gib(full['gradients'])} | {gib(full['optimizer'])} | {gib(full['transient'])} | "
            f"{gib(full['activations'])} ({gib(ckpt['activations'])}) | "
            f"{gib(sum(full.values()))} ({gib(sum(ckpt.values()))}) | "
            f"{verdict(spec, model, full, ckpt, args.gpus, capacity, seq_len)} |"
        )


if __name__ == "__main__":
    main()
