"""The first run a newcomer makes, timed: `python gpt2/train.py` with its defaults (tiny model, bundled
Shakespeare in bytes, CPU), from launch to the printed sample, in a fresh --out-dir.

    uv run python -m bench.first_run                          # the default run, ~2 min on 2 cores
    uv run python -m bench.first_run -- --max-steps 300       # any train.py flags after --

Prints the wall time, the final val loss beside the unigram baseline (the loss of a model that knows
only how common each token is), and the sample, which a person should recognise as Shakespeare-like
lines. The wall time depends on what else runs on the machine, so the load average and the run's
CPU time are printed beside it: on an idle machine the run takes about CPU time / cores. Nothing
here is asserted; tests/test_bench.py runs it for a couple of steps to check that it reports.
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.data import default_corpus, unigram_entropy

REPO = Path(__file__).resolve().parent.parent
RULE = "-" * 80  # train.py prints the sample between two of these


def run_train(train_args: list[str], out_dir: Path) -> tuple[str, float, float]:
    """train.py's output, its wall time and its CPU time (user + system, all threads) in seconds."""
    command = [sys.executable, str(REPO / "gpt2" / "train.py"), "--out-dir", str(out_dir), *train_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"train.py failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, wall, cpu


def data_dir_of(train_args: list[str]) -> Path:
    """The shards the run trained on: --data-dir if given, else the default corpus train.py prepares."""
    for i, arg in enumerate(train_args):
        if arg.startswith("--data-dir="):
            return Path(arg.split("=", 1)[1])
        if arg == "--data-dir" and i + 1 < len(train_args):
            return Path(train_args[i + 1])
    return default_corpus(REPO / "data")


def report(output: str, wall: float, cpu: float, baseline: float, load: tuple[float, float]) -> None:
    val_losses = re.findall(r"\| val loss (\S+)", output)
    parts = output.split(RULE)
    sample = parts[1].strip("\n") if len(parts) >= 3 else "(no sample printed)"
    print(f"wall time: {wall:.1f} s from launch to the sample (load average {load[0]:.2f} before, {load[1]:.2f} after)")
    cores = os.cpu_count() or 1
    print(f"CPU time: {cpu:.1f} s, so about {cpu / cores:.1f} s of wall on {cores} idle cores")
    final = f"{float(val_losses[-1]):.3f}" if val_losses else "(none printed)"
    print(f"final val loss: {final} (unigram baseline {baseline:.3f})")
    print(f"sample:\n{RULE}\n{sample}\n{RULE}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_args", nargs="*", help="flags for train.py, after --")
    parser.add_argument("--show-log", action="store_true", help="print train.py's whole output too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="first_run-") as tmp:
        load_before = os.getloadavg()[0]
        output, wall, cpu = run_train(args.train_args, Path(tmp) / "out")
        load_after = os.getloadavg()[0]
    if args.show_log:
        print(output)
    baseline = unigram_entropy(data_dir_of(args.train_args))
    report(output, wall, cpu, baseline, (load_before, load_after))


if __name__ == "__main__":
    main()
