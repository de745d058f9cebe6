"""The benchmarks run: each script's --quick smoke run, for every model in the registry, prints
its result lines, and the correctness checks it prints beside the timings hold: the first
training step's loss equals transformers', and greedy decoding produces transformers' tokens.
Timings and ratios are printed, never asserted: they depend on the machine and on what else runs
on it."""

import argparse
import re

import pytest
import torch

from bench import decode, first_run, loss_memory, mfu, mla, moe, muon, train_throughput
from registry import MODELS, by_name, import_transformers

models = pytest.mark.parametrize("model", [m.name for m in MODELS])


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The benchmarks pin torch to one thread (--threads 1); later tests must not inherit that."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@models
def test_train_throughput_quick(model, capsys):
    import_transformers()
    train_throughput.main(["--quick", "--model", model])
    out = capsys.readouterr().out
    for label in ("ours ", "HF ", "tokens/s", "train tokens/s ours / HF:", "target >= 1.2x"):
        assert label in out, out
    # same weights, same batch: the losses agree to float32 noise (~1e-6); a wrong weight mapping or
    # a missing loss term (e.g. the MoE balancing loss) moves them by >= 1e-3
    diff = float(re.search(r"first-step loss: ours \S+, HF \S+ \(\|diff\| (\S+);", out).group(1))
    assert diff <= 1e-4, out


@models
def test_decode_quick(model, capsys):
    import_transformers()
    decode.main(["--quick", "--model", model])
    out = capsys.readouterr().out
    for label in ("new tokens/s", "decode tokens/s ours / HF:", "target >= 1.5x"):
        assert label in out, out
    assert "tokens match: yes (all 16 new tokens identical)" in out, out


@models
def test_mfu_quick(model, capsys):
    mfu.main(["--quick", "--model", model, "--peak-tflops", "0.5"])
    out = capsys.readouterr().out
    for label in (
        "measured peak",
        "tokens/s",
        "FLOP/s achieved",
        "MFU: ",
        "% of the measured peak",
        "% of the nominal peak (--peak-tflops 0.5)",
    ):
        assert label in out, out


def test_mfu_nominal_peak_is_the_models_train_py_table(monkeypatch):
    """One peak table: bench/mfu.py reads GPU_PEAK_TFLOPS through the model's train.peak_flops."""
    train = by_name("llama31").train
    monkeypatch.setitem(train.GPU_PEAK_TFLOPS, "H100", 123.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    args = argparse.Namespace(model="llama31", peak_tflops=None, dtype="bfloat16")
    peak, label = mfu.nominal_peak(args, torch.device("cuda"), torch.bfloat16)
    assert peak == 123e12 and label == "NVIDIA H100 80GB HBM3, dense bfloat16 123 TFLOP/s, llama31/train.py"
    args.dtype = "float32"
    assert mfu.nominal_peak(args, torch.device("cuda"), torch.float32) == (None, None)  # the table is bf16's


def test_loss_memory_quick(capsys):
    loss_memory.main(["--quick"])
    out = capsys.readouterr().out
    for label in ("full fp32 logits", "plain ", "chunked ", "chunked / plain:", "target chunked <= 0.25x"):
        assert label in out, out
    # the chunked loss is the plain one in fp32 (summed in another order); a wrong row, chunk or mask is >= 1e-3
    found = re.search(r"losses: plain \S+, chunked \S+ \(\|diff\| (\S+)\); weight grad rel diff (\S+)", out)
    assert float(found.group(1)) <= 1e-5 and float(found.group(2)) <= 1e-5, out


def test_mla_quick(capsys):
    """bench/mla.py: each preset's cache holds the bytes of its formula (DeepSeek-V3's latent: 576 numbers
    per token and layer), and the absorbed and naive forms score the same tokens alike in fp32."""
    mla.main(["--quick"])
    out = capsys.readouterr().out
    for label in (
        "| DeepSeek-V3 671B | MLA, latent cache | 576 | 1,152 | 61 | 68.6 |",
        "| DeepSeek-V3 671B | MLA, keys/values expanded per head | 40,960 | 81,920 | 61 |",
        "| Llama 3.1 405B | GQA, 8 kv heads | 2,048 | 4,096 | 126 |",
        "cache bytes equal the formulas",
        "attention path of the absorbed form: torch",
        "greedy choices agree: yes (all 8 new tokens of every sequence)",
        "tokens/s",
        "decode tokens/s absorbed / naive:",
    ):
        assert label in out, out
    assert re.search(r"cache bytes equal the formulas \(.*\): yes", out), out
    # the same tokens fed to both forms: fp32 rounding (~1e-6) apart; a wrong absorption or cache is >= 1e-2
    diff = float(re.search(r"max \|absorbed - naive\| (\S+)", out).group(1))
    assert diff <= 1e-4, out


def test_muon_quick(capsys):
    """bench/muon.py on a toy MoE config: both optimizers' steps timed, and the Muon timed is K2's: one step
    moves each matrix and expert by about 0.2 lr in RMS (NS5 leaves singular values near 0.7..1, so ~0.15..0.2);
    without the 0.2 sqrt(max(A, B)) scaling it would be under 0.1."""
    ratio = muon.main(["--quick", "--preset", "tiny_moe"])
    out = capsys.readouterr().out
    for label in ("of them on Muon", "muon:", "adamw:", "forward+backward:", "Muon step / AdamW step:"):
        assert label in out, out
    assert ratio > 0
    found = re.search(r"Muon update RMS / lr over (\d+) matrices: (\S+) \.\. (\S+) ", out)
    assert int(found.group(1)) > 8 and 0.12 <= float(found.group(2)) <= float(found.group(3)) <= 0.25, out


def test_moe_layer_runs(capsys):
    moe.main(["--experts", "8", "--tokens", "16", "--n-embd", "16", "--hidden", "8", "--repeats", "1"])
    row = capsys.readouterr().out.splitlines()[2]  # after the setting and the header
    assert row.startswith("16 | 8 | 2 | "), row


def test_set_is_parsed_by_the_models_train_py():
    """bench's --set is train.py's: typed by the Config field, with train.py's error for a bad one."""
    with pytest.raises(SystemExit, match="--set 'n_layers=3': expected FIELD=VALUE with FIELD one of"):
        decode.main(["--quick", "--set", "n_layers=3"])
    with pytest.raises(SystemExit, match="'two' is not a valid int"):
        mfu.main(["--quick", "--model", "qwen3_moe", "--set", "n_experts=two"])


def test_first_run_reports(capsys, toy_data):
    """bench.first_run times `python gpt2/train.py` (here two steps on the toy shards) and prints what
    a person judges the run by: the time, the val loss beside the unigram baseline, and the sample."""
    train_args = ["--data-dir", str(toy_data), "--tokenizer", "bytes", "--max-steps", "2", "--batch-size", "2"]
    first_run.main(["--", *train_args, "--seq-len", "16", "--eval-steps", "1", "--sample-tokens", "8"])
    out = capsys.readouterr().out
    assert re.search(r"wall time: [\d.]+ s from launch to the sample \(load average", out), out
    assert re.search(r"final val loss: [\d.]+ \(unigram baseline [\d.]+\)", out), out
    assert "no sample printed" not in out.split("sample:")[1], out


def test_gpu_check_runs_are_valid_compiled_train_py_runs_that_fit_an_h100():
    """bench/gpu_check runs on a lent GPU only: here each run's arguments parse through its model's train.py
    (--compile, one micro-batch per step, warm steps after the first log line) and its memory estimate,
    from the meta model, fits an H100's 80 GB."""
    from bench import gpu_check

    assert {package for _, package, _ in gpu_check.RUNS} == {"gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"}
    for name, package, arguments in gpu_check.RUNS:
        spec = by_name(package)
        args = spec.train.parse_args(gpu_check.arguments_of(arguments).split() + ["--device", "cpu"])
        assert args.compile and args.max_steps > 2 * args.log_every, name
        with torch.device("meta"):
            model = spec.model.Transformer(spec.train.config_from_args(args))
        plan = spec.infra.memory_plan(model, args, 1, torch.bfloat16)
        assert sum(plan.values()) < 75 * 2**30, (name, {k: v / 2**30 for k, v in plan.items()})


def test_compile_step_quick(capsys):
    """bench/compile_step's smoke run (aot_eager, not inductor): the compiled copy's first loss is eager's."""
    from bench import compile_step

    compile_step.main(["--quick", "--models", "gpt2"])
    losses = capsys.readouterr().out.splitlines()[-1].split()[-3:]
    assert losses[0] == losses[2], losses
