"""train.py at scale, on CPU with 2 forked gloo ranks: the model is built on the meta device and
each rank allocates only its FSDP shard, yet starts from exactly the single-process initial values;
gradients stay sharded through an accumulation; --init-from under FSDP reads the checkpoint layer by
layer and gives the single-process model's logits."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from registry import MODELS
from train_helpers import fork_ranks

models = pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
CPU = torch.device("cpu")


def build_args(**kw):
    return SimpleNamespace(**{"activation_checkpointing": False, "compile": False, "init_from": None, **kw})


def on_ranks(fn, *args, nproc=2):
    """fn(rank, *args) in nproc forked processes joined in a gloo group, as torchrun would run them."""
    fork_ranks(_rank, fn, args, nproc=nproc, timeout=120)


def _rank(rank, world_size, port, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def full_state(model):
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _init_under_fsdp(rank, spec, out):
    torch.manual_seed(1337)
    model, _ = spec.infra.build_model(build_args(parallel="fsdp"), spec.config(), CPU, torch.float32)
    local = sum(p.to_local().numel() for p in model.parameters())
    state = full_state(model)  # gathered: a collective, so every rank takes part
    assert local < 0.6 * sum(t.numel() for t in state.values())  # this rank holds about half
    if rank == 0:
        torch.save(state, out)


@models
def test_fsdp_initialisation_is_the_single_process_one(spec, tmp_path):
    """Built on meta and initialised shard by shard, the gathered model has the unsharded one's
    per-tensor mean and std, in fact its very values; a tied head stays tied."""
    on_ranks(_init_under_fsdp, spec, tmp_path / "fsdp.pt")
    sharded = torch.load(tmp_path / "fsdp.pt")
    torch.manual_seed(1337)
    model, _ = spec.infra.build_model(build_args(parallel="none"), spec.config(), CPU, torch.float32)
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight
    single = full_state(model)
    assert list(sharded) == list(single)
    for name, t in single.items():
        assert sharded[name].mean().item() == pytest.approx(t.mean().item(), abs=1e-7), name
        assert sharded[name].std().item() == pytest.approx(t.std().item(), abs=1e-7), name
        assert torch.equal(sharded[name], t), name
    # and the initial distribution is the model's own: reset_parameters on a model built the usual way
    torch.manual_seed(0)
    reference = spec.model.Transformer(spec.config())
    for name, p in reference.named_parameters():
        assert single[name].std().item() == pytest.approx(p.std().item(), rel=0.2, abs=1e-6), name
    if "rope_cos" in dict(model.named_buffers()):  # rebuilt after to_empty, on the right device
        assert torch.equal(model.rope_cos, reference.rope_cos)


def _accumulate(rank, spec):
    torch.manual_seed(1337)
    args = build_args(parallel="fsdp")
    model, wrapped = spec.infra.build_model(args, spec.config(), CPU, torch.float32)
    x = torch.randint(0, model.cfg.vocab_size, (2, 8))
    spec.infra.set_gradient_sync(wrapped, args, enabled=False)  # the first of two micro-batches
    wrapped(x, x)[1].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    # reduce-scattered already: each rank holds only its shard of the gradient, not a full fp32 copy
    assert all(isinstance(g, DTensor) for g in grads), "FSDP kept unsharded gradients through the accumulation"
    assert all(g.to_local().shape == p.to_local().shape for g, p in zip(grads, model.parameters()))


def test_fsdp_gradient_accumulation_keeps_gradients_sharded():
    on_ranks(_accumulate, MODELS[0])


def _logits_under_fsdp(rank, spec, path, idx, out):
    args = build_args(parallel="fsdp", init_from=str(path))
    model, wrapped = spec.infra.build_model(args, spec.config(), CPU, torch.float32)
    with torch.no_grad():
        logits = wrapped(idx)[0]
    if rank == 0:
        torch.save(logits, out)


@models
def test_fsdp_init_from_gives_the_single_process_logits(spec, tmp_path):
    from registry import randomize_

    source = spec.build(seed=3)
    randomize_(source)  # std-0.1 weights: a misplaced shard moves the logits visibly
    source.save_pretrained(tmp_path / "hf", max_shard_bytes=20_000)  # several files, layers split across them
    idx = torch.randint(0, source.cfg.vocab_size, (2, 12))
    on_ranks(_logits_under_fsdp, spec, tmp_path / "hf", idx, tmp_path / "logits.pt")
    expected = spec.model.Transformer.from_pretrained(tmp_path / "hf")(idx)[0]
    single, _ = spec.infra.build_model(
        build_args(parallel="none", init_from=str(tmp_path / "hf")), source.cfg, CPU, None
    )
    torch.testing.assert_close(single(idx)[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)


def test_init_from_names_what_does_not_match(tmp_path):
    spec = MODELS[0]
    spec.build().save_pretrained(tmp_path)
    args = build_args(parallel="none", init_from=str(tmp_path))
    with pytest.raises(SystemExit, match=r"missing keys: \['layers\.2"):
        spec.infra.build_model(args, spec.config(n_layer=3), CPU, None)


@pytest.mark.parametrize(
    "package, argv, expected, recipe",
    [
        ("gpt2", ["--preset", "gpt2"], dict(lr=6e-4, warmup_steps=700, total_batch_tokens=2**19), True),
        ("gpt2", ["--preset", "gpt2", "--lr", "1e-3"], dict(lr=1e-3, warmup_steps=700), True),
        ("gpt2", [], dict(lr=5e-3, warmup_steps=20, total_batch_tokens=None, min_lr_ratio=0.1), False),
        ("llama31", ["--preset", "llama31_405b"], dict(lr=8e-5, warmup_steps=8000, min_lr_ratio=0.01), True),
        ("llama31", ["--preset", "llama31_8b", "--warmup-steps", "0"], dict(lr=3e-4, warmup_steps=0), True),
        ("qwen3", ["--preset", "qwen3_8b"], dict(lr=5e-3, warmup_steps=20), False),  # none published
    ],
)
def test_presets_train_with_their_published_recipe_unless_a_flag_says_otherwise(package, argv, expected, recipe):
    import importlib

    args = importlib.import_module(f"{package}.train").parse_args(argv)
    assert {name: getattr(args, name) for name in expected} == expected
    assert bool(args.recipe) == recipe
    assert not set(args.recipe) & {a.lstrip("-").replace("-", "_") for a in argv}  # a flag given is not the recipe's
