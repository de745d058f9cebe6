"""Host memory of `--init-from` under FSDP: each rank's peak RSS while train.py's build_model loads a
Hugging Face checkpoint with 2 gloo ranks (meta-device model, the checkpoint read one layer at a time,
each rank reading from the file only its rows of each tensor that is only renamed), against the plain
way every rank used to load it (a full random model, then the whole checkpoint into memory:
Transformer.from_pretrained). The peak comes at the end, when the whole shard is written: sliced
reads cut the bytes each rank reads and the early transients (the embedding), less the peak.

    python -m bench.load_memory            # gpt2_medium in fp32: a 1.4 GB checkpoint (~1 min)
    python -m bench.load_memory --quick    # the tiny preset, seconds
    python -m bench.load_memory --model llama31 --preset llama32_1b --set n_layer=4 vocab_size=32000  # 1.2 GB

Each measurement runs in a freshly spawned process (a forked one would start from its parent's
peak), and reports resource.getrusage's ru_maxrss: resident memory, file-backed pages included.
"""

import argparse
import multiprocessing
import os
import resource
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from shared.models import MODELS, by_name


def import_everything(model_name):
    """What loading needs imported (torch.distributed, FSDP, DTensor, the model's train.py), so that the
    peak measured before loading counts the code and only the growth after it counts the weights."""
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    return by_name(model_name)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_checkpoint(model_name, preset, overrides, path, out):
    import torch

    spec = by_name(model_name)
    torch.manual_seed(0)
    model = spec.model.Transformer(spec.model.Config.from_preset(preset, **spec.infra.parse_overrides(overrides)))
    model.save_pretrained(path)
    out.put((model.num_params(), sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))))


def load_plain(model_name, path, out):
    import torch

    torch.set_num_threads(1)
    spec = import_everything(model_name)
    spec.train  # noqa: B018 (imported, as in load_fsdp)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    spec.model.Transformer.from_pretrained(path)
    out.put((0, before, peak_rss_mb(), time.perf_counter() - t0))


def load_fsdp(model_name, path, rank, world_size, port, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    spec = import_everything(model_name)
    cfg = spec.hf.read_config(path)
    args = SimpleNamespace(activation_checkpointing=False, compile=False, init_from=str(path), parallel="fsdp")
    before = peak_rss_mb()
    t0 = time.perf_counter()
    spec.infra.build_model(args, cfg, torch.device("cpu"), torch.float32)
    dist.barrier()
    out.put((rank, before, peak_rss_mb(), time.perf_counter() - t0))
    dist.destroy_process_group()


def run(ctx, target, per_process):
    """target(*args, queue) in one spawned process per args tuple; what each puts on the queue, sorted."""
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out)) for args in per_process]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs), "a process failed; see its traceback above"
    return sorted(results)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", choices=[m.name for m in MODELS])
    p.add_argument("--preset", help="Config preset of the checkpoint (default: gpt2_medium, or tiny with --quick)")
    p.add_argument("--quick", action="store_true", help="the tiny preset: a few-second smoke run")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="Config overrides, as train.py's")
    args = p.parse_args(argv)
    preset = args.preset or ("tiny" if args.quick else "gpt2_medium")
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        [(n_params, size)] = run(ctx, write_checkpoint, [(args.model, preset, args.set, tmp)])
        gb = size / 1e9
        print(
            f"{args.model} {preset} {' '.join(args.set)}: {n_params:,} params, checkpoint {gb:.3f} GB (fp32 safetensors)"
        )
        print(
            "peak RSS per process, MB (after importing torch -> after loading; growth as a fraction of the checkpoint)"
        )
        plain = run(ctx, load_plain, [(args.model, tmp)])
        port = free_port()
        fsdp = run(ctx, load_fsdp, [(args.model, tmp, rank, args.ranks, port) for rank in range(args.ranks)])
        for label, rows in (("plain from_pretrained, every rank", plain), (f"FSDP, {args.ranks} ranks", fsdp)):
            for rank, before, after, seconds in rows:
                growth = (after - before) * 2**20 / size
                print(
                    f"  {label:34s} rank {rank}: {before:7.0f} -> {after:7.0f} MB  "
                    f"(+{growth:.2f} x checkpoint, {seconds:.1f} s)"
                )
        worst_fsdp = max(after - before for _, before, after, _ in fsdp)
        worst_plain = max(after - before for _, before, after, _ in plain)
        print(f"FSDP per-rank growth / plain growth: {worst_fsdp / worst_plain:.2f}")


if __name__ == "__main__":
    main()
