"""The whole model under torch.compile (issue #22): every model's forward, with the loss in training
mode (targets and the aux dict passed as the training loop passes them) and in eval mode, traces
into one graph (fullgraph=True: a graph break is an error) and is not recompiled for new batches of
the same shape; the compiled losses, gradients and aux statistics equal eager's. And a training
step reads nothing back from the device (no host sync), while a direct call still names a bad id.
And train.py's --compile (infra.build_model) runs that whole forward: one graph per signature over
steps and evaluations, with an eager run's losses.

The graphs are counted by a backend of this file: dynamo decides graph breaks and recompiles whatever
the backend. Training graphs run through aot_eager, whose AOTAutograd traces the backward as inductor
would (the chunked loss's autograd.Function included), in seconds per model; inductor's code
generation would take minutes on two CPU cores."""

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from registry import MODELS
from sync_counter import HostSyncCounter
from train_helpers import run_in_process, train_args

models = pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
STEPS = 3  # batches of one shape: the first compiles, the others must reuse the graph


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them with another backend:
    aot_eager where the backward matters, eager (the captured graph as it is) where it does not."""

    def __init__(self, run="aot_eager"):
        self.graphs, self.run = 0, torch._dynamo.lookup_backend(run)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.run(gm, example_inputs)


def batches(vocab_size, n=STEPS, shape=(2, 16)):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        idx, targets = (
            torch.randint(0, vocab_size, shape, generator=g),
            torch.randint(0, vocab_size, shape, generator=g),
        )
        targets[0, :3] = -100  # ignored positions, as a packed or masked batch has
        yield idx, targets


def loss_grads_aux(model, idx, targets):
    """One training step's loss, every parameter's gradient and the aux statistics, as the loop takes them."""
    model.zero_grad(set_to_none=True)
    aux = {}
    _, loss = model(idx, targets, aux=aux)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, aux


def assert_equal_steps(eager, compiled):
    """Loss, gradients and aux of one step agree (aot_eager runs the same kernels, in another order)."""
    for (name, a), b in zip(
        [("loss", eager[0]), *eager[1].items(), *eager[2].items()],
        [compiled[0], *compiled[1].values(), *compiled[2].values()],
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert eager[1].keys() == compiled[1].keys() and eager[2].keys() == compiled[2].keys()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no cache shared between tests: each one counts its own compiles
    yield
    torch._dynamo.reset()


@models
def test_training_forward_with_loss_is_one_graph_and_equals_eager(spec):
    model = spec.build().train()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for idx, targets in batches(model.cfg.vocab_size):
        expected = loss_grads_aux(model, idx, targets)
        assert_equal_steps(expected, loss_grads_aux(compiled, idx, targets))
    assert backend.graphs == 1, f"{backend.graphs} graphs: recompiled for a batch of the same shape"


@models
def test_eval_forward_is_one_graph_per_signature_and_equals_eager(spec):
    model = spec.build().eval()
    backend = CountingBackend(run="eager")  # no backward to trace
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for idx, targets in batches(model.cfg.vocab_size):
            torch.testing.assert_close(compiled(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(compiled(idx, targets)[1], model(idx, targets)[1], rtol=1e-5, atol=1e-6)
    assert backend.graphs == 2, f"{backend.graphs} graphs: logits and loss should compile once each"


@models
def test_training_step_makes_no_host_sync(spec):
    model = spec.build().train()
    idx, targets = next(batches(model.cfg.vocab_size))
    with HostSyncCounter() as syncs:
        _, loss = model(idx, targets, aux={})
        loss.backward()
    assert syncs.ops == []
    with HostSyncCounter() as syncs:  # the counter sees the one read a direct call makes to check the ids
        model(idx)
    assert syncs.ops == ["aten::_local_scalar_dense"]


@models
def test_training_step_still_refuses_a_token_outside_the_vocabulary(spec):
    """Checked on the device (torch._assert_async): an error without the id, and without a host sync."""
    model = spec.build().train()
    idx, targets = next(batches(model.cfg.vocab_size))
    idx[1, 5] = model.cfg.vocab_size
    with pytest.raises(RuntimeError, match=r"token ids outside the vocabulary \[0, 97\)"):
        model(idx, targets)


def test_chunked_loss_with_padding_rows_is_one_graph_and_equals_eager():
    """The chunked path (the vocabulary too large for one chunk, here by chunk_rows) and a padded head,
    which the small models' forwards above do not take: its autograd.Function traces, backward included."""
    loss_module = MODELS[0].model  # byte-identical in every model.py (test_copies)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)  # 31 ids + 9 padding rows
    backend = CountingBackend()
    compiled = torch.compile(loss_module.linear_cross_entropy, backend=backend, fullgraph=True)
    results = []
    for fn in (loss_module.linear_cross_entropy, compiled):
        targets = torch.randint(0, 31, (23,), generator=torch.Generator().manual_seed(1))
        x.grad = weight.grad = None
        loss = fn(x, weight, targets, chunk_rows=5, vocab_size=31)
        loss.backward()
        results.append((loss.detach(), x.grad, weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert backend.graphs == 1


@models
def test_train_py_compile_is_one_graph_per_signature_with_eager_losses(spec, toy_data, tmp_path, monkeypatch):
    """`--compile` through the real train(): build_model compiles the whole forward, loss included, with
    fullgraph=True (a graph break is an error); four steps with two evaluations compile three graphs
    (training, eval, the no-grad forward that proves the last checkpoint), none again for a later step,
    and every step's loss and the validation losses equal an eager run's."""
    backend = CountingBackend()  # aot_eager: AOTAutograd traces the backward as inductor would, in seconds
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    steps = ("--max-steps", 4, "--eval-every", 2, "--log-every", 2)
    eager = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "eager", *steps))
    assert backend.graphs == 0
    counters.clear()
    compiled = run_in_process(spec, *train_args(spec, toy_data, tmp_path / "compiled", *steps), "--compile")
    assert backend.graphs == 3, f"{backend.graphs} graphs: a step or an evaluation recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [row.keys() for row in compiled] == [row.keys() for row in eager]
    for expected, got in zip(eager, compiled, strict=True):
        for key in ("loss", "val_loss"):
            if key in expected:
                assert got[key] == pytest.approx(expected[key], abs=1e-5), (expected, got)
