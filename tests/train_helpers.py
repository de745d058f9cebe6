"""Running a model's train.py from tests: in this process, or under torchrun with 2 gloo ranks."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_args(spec, data_dir, out_dir, *extra):
    """Arguments for a few quick steps of spec's small model on data_dir."""
    overrides = [f"--set={k}={v}" for k, v in spec.small.items()]
    return [
        *overrides,
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(out_dir),
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--eval-every",
        "0",
        "--eval-steps",
        "2",
        "--log-every",
        "1",
        "--sample-tokens",
        "0",
        "--device",
        "cpu",
        *map(str, extra),
    ]


def run_in_process(spec, *args):
    """Call spec's train.py main(); returns the list of metric rows it recorded."""
    return spec.train.main([str(a) for a in args])


def run_torchrun(spec, *args, nproc=2):
    """Launch spec's train.py as a user would, under torchrun; returns its metrics.jsonl rows."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / spec.package / "train.py"),
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


def run_ranks(spec, *args, nproc=2):
    """torchrun's job, done with forked processes: each rank gets the environment torchrun would
    set and calls main(). Forking skips re-importing torch per rank, which keeps the suite fast;
    test_distributed.py also launches the real torchrun once."""
    main_on_ranks(spec.train.main, *args, nproc=nproc)


def main_on_ranks(main, *args, nproc=2):
    """main(args) on nproc forked gloo ranks, each with torchrun's environment (see run_ranks): for
    train.py and the post-training scripts alike."""
    fork_ranks(_rank_main, main, [str(a) for a in args], nproc=nproc)


def fork_ranks(target, *args, nproc=2, timeout=300):
    """target(rank, world_size, port, *args) in nproc forked processes; every one must exit 0."""
    ctx, port = multiprocessing.get_context("fork"), free_port()
    procs = [ctx.Process(target=target, args=(rank, nproc, port, *args)) for rank in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    assert [p.exitcode for p in procs] == [0] * nproc, "a rank failed; its traceback is in the captured stderr"


def torchrun_environment(rank, world_size, port):
    """The variables torchrun sets for one rank of a single-machine job."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch

    torch.set_num_threads(1)  # the ranks share the machine's cores


def _rank_main(rank, world_size, port, main, args):
    torchrun_environment(rank, world_size, port)
    main(args)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
