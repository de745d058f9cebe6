"""Training on CPU: the loss drops, a resumed run continues bit-for-bit, checkpoints load without
pickle, a non-finite loss stops the run and keeps the last good checkpoint, and sampling works.
The flags that change how a step is computed (--dtype bfloat16, --activation-checkpointing,
--compile) are each shown to take effect, not only to leave the losses alone."""

import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from registry import MODELS
from shared.data import DataLoader
from train_helpers import ROOT, losses, run_in_process, train_args

models = pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)


@models
def test_training_lowers_the_loss(spec, toy_data, tmp_path):
    rows = run_in_process(spec, *train_args(spec, toy_data, tmp_path, "--max-steps", 30, "--lr", "1e-2"))
    loss = losses(rows)
    assert len(loss) == 30
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert sum(loss[-5:]) / 5 < loss[0] - 1.5, loss
    assert val[-1] < loss[0] - 1.5


@models
def test_resume_continues_bit_for_bit(spec, toy_data, tmp_path):
    whole = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "whole", "--max-steps", 6))
    args = train_args(spec, toy_data, tmp_path / "split", "--max-steps", 6)
    first = run_in_process(spec, *args, "--stop-after", 3)
    second = run_in_process(spec, *args, "--resume")
    assert losses(first) + losses(second) == losses(whole)  # exactly equal, not approximately
    assert [r["lr"] for r in first + second if "lr" in r] == [r["lr"] for r in whole if "lr" in r]


@models
def test_checkpoint_loads_without_pickle(spec, toy_data, tmp_path):
    run_in_process(spec, *train_args(spec, toy_data, tmp_path, "--max-steps", 2))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # refuses arbitrary pickled code
    assert set(state) == {"model", "optim", "meta"}
    assert state["meta"]["step"] == 2 and set(state["meta"]["loader"]) == {"shard", "pos"}
    assert not any(k.startswith("_orig_mod") for k in state["model"])
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file behind


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy_data, tmp_path):
    spec = MODELS[0]
    args = train_args(spec, toy_data, tmp_path, "--max-steps", 10, "--ckpt-every", 1)
    run_in_process(spec, *args, "--stop-after", 2)
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at step \d+: stopping .* last good checkpoint"):
        run_in_process(spec, *args, "--resume", "--lr", "1e12", "--grad-clip", "0")
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # the last step whose loss was finite
    assert kept["meta"]["step"] >= 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_generate_from_checkpoint(toy_data, tmp_path, capsys):
    spec = MODELS[0]
    args = train_args(spec, toy_data, tmp_path, "--max-steps", 2)
    run_in_process(spec, *args)
    capsys.readouterr()
    run_in_process(spec, *args, "--generate", "--prompt", "!", "--sample-tokens", 5)
    out = capsys.readouterr().out
    assert "loaded" in out and out.count("-" * 80) == 2


@models
def test_train_script_runs_from_the_repo_root(spec):
    """`python <model>/train.py --help` works as a plain script: no sys.path tricks needed."""
    done = subprocess.run(
        [sys.executable, f"{spec.package}/train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--parallel" in done.stdout and "--resume" in done.stdout


def test_parse_overrides_types_each_value_by_its_config_field():
    """--set FIELD=VALUE (train.py's, and bench/'s through it): ints, floats, bools, None, strings
    and comma-separated tuples, as the Config field declares."""
    from llama31.infra import parse_overrides as llama31_overrides
    from qwen3.infra import parse_overrides

    got = parse_overrides(
        [
            "n_layer=8",
            "norm_eps=1e-6",
            "rope_theta=5e5",
            "tie_embeddings=false",
            "norm_topk_prob=1",
            "attn_impl=math",
            "mlp_only_layers=1,3",
        ]
    )
    assert got == dict(
        n_layer=8,
        norm_eps=1e-6,
        rope_theta=500000.0,
        tie_embeddings=False,
        norm_topk_prob=True,
        attn_impl="math",
        mlp_only_layers=(1, 3),
    )
    assert type(got["n_layer"]) is int and type(got["rope_theta"]) is float
    assert parse_overrides(["mlp_only_layers=", "n_layer=2", "n_layer=3"]) == dict(mlp_only_layers=(), n_layer=3)
    assert llama31_overrides(["rope_factor=none"]) == dict(rope_factor=None)
    assert llama31_overrides(["rope_factor=4"]) == dict(rope_factor=4.0)
    for bad in ("n_layers=2", "n_layer", "=2"):
        with pytest.raises(ValueError, match=f"--set '{bad}': expected FIELD=VALUE with FIELD one of vocab_size, "):
            parse_overrides([bad])
    for bad, value, type_name in (
        ("n_layer=two", "two", "int"),
        ("norm_eps=small", "small", "float"),
        ("tie_embeddings=maybe", "maybe", "bool"),
        ("mlp_only_layers=1,x", "1,x", "tuple"),
    ):
        with pytest.raises(ValueError, match=f"--set '{bad}': '{value}' is not a valid {type_name}"):
            parse_overrides([bad])


def test_bad_override_is_a_clear_error(toy_data, tmp_path):
    spec = MODELS[0]
    with pytest.raises(SystemExit, match="--set 'n_layers=2': expected FIELD=VALUE with FIELD one of"):
        run_in_process(spec, *train_args(spec, toy_data, tmp_path), "--set", "n_layers=2")
    with pytest.raises(SystemExit, match="'two' is not a valid"):
        run_in_process(spec, *train_args(spec, toy_data, tmp_path), "--set", "n_layer=two")


def count_block_forwards(spec, monkeypatch):
    """Count the model's Block.forward calls that autograd records: the training forwards and their
    recomputation in backward, not evaluation's. build_model wraps each block's (bound) forward for
    checkpointing, so a patch of the class made before main() is what runs in both cases."""
    calls = []
    forward = spec.model.Block.forward

    def counted(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(spec.model.Block, "forward", counted)
    return calls


@models
def test_activation_checkpointing_changes_memory_not_results(spec, toy_data, tmp_path, monkeypatch):
    """Each block runs twice per step, its activations recomputed in backward; the losses stay."""
    # every Block the model has, the main layers and any other (DeepSeek-V3's MTP module runs one more)
    n_blocks = sum(isinstance(m, spec.model.Block) for m in spec.build().modules())
    calls, steps = count_block_forwards(spec, monkeypatch), 3
    plain = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "plain", "--max-steps", steps))
    assert len(calls) == steps * n_blocks
    calls.clear()
    recomputed = run_in_process(
        spec, *train_args(spec, toy_data, tmp_path / "ckpt", "--max-steps", steps), "--activation-checkpointing"
    )
    assert len(calls) == 2 * steps * n_blocks
    assert losses(recomputed) == pytest.approx(losses(plain), abs=1e-6)
    state = torch.load(tmp_path / "ckpt" / "ckpt.pt", weights_only=True)["model"]
    assert set(state) == set(torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)["model"])


def test_init_from_a_hugging_face_directory(toy_data, tmp_path):
    """--init-from starts training from save_pretrained's (= Hugging Face's) format."""
    spec = MODELS[0]
    pretrained = spec.build(seed=7)
    pretrained.save_pretrained(tmp_path / "hf")
    args = train_args(spec, toy_data, tmp_path / "run", "--max-steps", 1)
    args = [a for a in args if not a.startswith("--set=")]  # the architecture comes from config.json
    rows = run_in_process(spec, *args, "--init-from", tmp_path / "hf")
    loader = DataLoader(toy_data, "train", batch_size=4, seq_len=16)
    with torch.no_grad():
        expected = pretrained(*loader.next_batch())[1].item()
    assert losses(rows)[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_learning_rate_schedules(schedule):
    from gpt2.train import lr_at, parse_args

    args = parse_args(
        [
            "--lr",
            "1.0",
            "--min-lr-ratio",
            "0.1",
            "--warmup-steps",
            "10",
            "--max-steps",
            "100",
            "--schedule",
            schedule,
            "--decay-frac",
            "0.2",
        ]
    )
    lrs = [lr_at(step, args) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # never rises after warmup
    assert lrs[-1] == pytest.approx(0.1)  # the last step runs at min_lr
    if schedule == "wsd":
        assert lrs[10:80] == [1.0] * 70  # stable until the last 20% of steps


@models
def test_bf16_mixed_precision_tracks_fp32(spec, toy_data, tmp_path, monkeypatch):
    """--dtype bfloat16 runs the model under autocast (the GPU default; CPU autocast here): its
    logits come out of a bf16 matmul, and the losses track fp32's closely without equalling them."""
    dtypes = set()
    apply = spec.model.ChunkedCrossEntropy.apply  # the loss computes the logits, a chunk at a time

    def recorded(x, weight, *args):
        dtypes.add(torch.promote_types(x.dtype, weight.dtype))
        return apply(x, weight, *args)

    monkeypatch.setattr(spec.model.ChunkedCrossEntropy, "apply", recorded)
    monkeypatch.setattr(spec.model, "LOSS_CHUNK_ELEMENTS", 1)  # chunked: the toy logits would fit one chunk
    fp32 = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "fp32", "--max-steps", 3))
    assert dtypes == {torch.float32}
    dtypes.clear()
    bf16 = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "bf16", "--max-steps", 3), "--dtype", "bfloat16")
    assert dtypes == {torch.bfloat16}
    assert losses(bf16) == pytest.approx(losses(fp32), abs=2e-2)
    assert all(a != b for a, b in zip(losses(bf16), losses(fp32)))  # bf16 rounding shows in every step


def test_compiled_training_matches_eager_and_saves_plain_names(toy_data, tmp_path):
    """--compile really compiles (dynamo captures graphs, none without the flag), and the compiled
    model trains like the eager one and saves its parameters under their plain names."""
    spec = MODELS[0]  # torch.compile takes ~30 s on CPU: one model stands for the shared train.py code
    torch._dynamo.reset()  # forget what earlier tests compiled
    counters.clear()
    eager = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "eager", "--max-steps", 3))
    assert counters["stats"]["unique_graphs"] == 0
    compiled = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "compiled", "--max-steps", 3), "--compile")
    # one graph per signature (training, eval, the no-grad forward proving the last checkpoint), each
    # through AOTAutograd; whole-model compile with fullgraph=True counts no "frames" as per-block compile did
    assert counters["stats"]["unique_graphs"] >= 1 and counters["aot_autograd"]["ok"] >= 1
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-4)
    state = torch.load(tmp_path / "compiled" / "ckpt.pt", weights_only=True)["model"]
    assert set(state) == set(spec.build().state_dict())  # no "_orig_mod." prefix
