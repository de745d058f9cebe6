"""The benchmarks run: each script's --quick smoke run, for every model the benchmarks know,
prints its result lines. Timings and ratios are printed, never asserted: they depend on the
machine and on what else runs on it."""

import importlib.util

import pytest

from bench import decode, mfu, train_throughput
from bench.common import MODELS, parse_set

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="compares against transformers")


@needs_hf
@pytest.mark.parametrize("model", sorted(MODELS))
def test_train_throughput_quick(model, capsys):
    train_throughput.main(["--quick", "--model", model])
    out = capsys.readouterr().out
    for label in ("first-step loss: ours", "ours ", "HF ", "tokens/s", "train tokens/s ours / HF:", "target >= 1.2x"):
        assert label in out, out


@needs_hf
@pytest.mark.parametrize("model", sorted(MODELS))
def test_decode_quick(model, capsys):
    decode.main(["--quick", "--model", model])
    out = capsys.readouterr().out
    for label in ("tokens match: ", "new tokens/s", "decode tokens/s ours / HF:", "target >= 1.5x"):
        assert label in out, out


@pytest.mark.parametrize("model", sorted(MODELS))
def test_mfu_quick(model, capsys):
    mfu.main(["--quick", "--model", model])
    out = capsys.readouterr().out
    for label in ("measured peak", "tokens/s", "FLOP/s achieved", "MFU: ", "% of the measured peak"):
        assert label in out, out


def test_parse_set():
    got = parse_set(["n_layer=8", "norm_eps=1e-6", "tie_embeddings=false", "attn_impl=math", "rope_factor=none"])
    assert got == dict(n_layer=8, norm_eps=1e-6, tie_embeddings=False, attn_impl="math", rope_factor=None)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_set(["n_layer"])
