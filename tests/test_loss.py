"""The memory-bounded loss (model.py's linear_cross_entropy, used by every Transformer.forward given
targets): equal to the plain F.cross_entropy over the full fp32 logits, in value and in the
gradients of the hidden states and of the lm_head weight (tied to the embedding or not), with
ignored rows, under bf16 autocast, and for each model end to end; and it never keeps a
(rows, vocab_size) tensor for backward."""

import pytest
import torch
import torch.nn.functional as F

from registry import MODELS, randomize_

loss_module = MODELS[0].model  # the function is byte-identical in every model.py (test_copies)
N, D, V = 23, 8, 31  # 23 rows: chunks of 5 leave a short last one


def plain(x, weight, targets):
    return F.cross_entropy(F.linear(x, weight).float().flatten(0, -2), targets.flatten(), ignore_index=-100)


def inputs(dtype=torch.float32, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = -100
    return x, weight, targets


def value_and_grads(fn, x, weight, targets):
    x.grad = weight.grad = None
    loss = fn(x, weight, targets)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [1, 5, N, None])  # None: one F.cross_entropy, as the logits are small
@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_equals_plain_cross_entropy_in_fp32(chunk_rows, ignored):
    x, weight, targets = inputs(ignored=ignored)
    ours = value_and_grads(lambda *a: loss_module.linear_cross_entropy(*a, chunk_rows=chunk_rows), x, weight, targets)
    expected = value_and_grads(plain, x, weight, targets)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_batched_input_and_every_target_ignored():
    x, weight, targets = inputs()
    x3, t3 = x.detach().view(1, N, D), targets.view(1, N)  # (B, T, n_embd) as Transformer.forward passes it
    torch.testing.assert_close(loss_module.linear_cross_entropy(x3, weight, t3), plain(x3, weight, t3))
    nothing = torch.full_like(targets, -100)  # 0 / 0, as F.cross_entropy
    assert loss_module.linear_cross_entropy(x, weight, nothing, chunk_rows=5).isnan()


def test_tied_weight_gets_both_gradients():
    """The embedding and the head share one matrix: its gradient is the sum of both uses."""
    _, weight, targets = inputs()
    idx = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))

    def through_embedding(fn):
        weight.grad = None
        fn(torch.tanh(F.embedding(idx, weight)), weight, targets).backward()
        return weight.grad

    ours = through_embedding(lambda *a: loss_module.linear_cross_entropy(*a, chunk_rows=5))
    torch.testing.assert_close(ours, through_embedding(plain), rtol=1e-6, atol=1e-6)


def test_bf16_autocast_tracks_the_plain_path():
    """Under autocast both compute the logits in bf16 and reduce them in fp32; ours accumulates the
    weight gradient over chunks in bf16 (one rounding per chunk), so they agree to bf16's precision."""
    x, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = value_and_grads(lambda *a: loss_module.linear_cross_entropy(*a, chunk_rows=5), x, weight, targets)
        expected = value_and_grads(plain, x, weight, targets)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32  # fp32 master weight's gradient
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    fp32 = value_and_grads(plain, x, weight, targets)
    assert (ours[2] - fp32[2]).abs().max() > 0  # the bf16 matmuls really ran


def test_no_rows_by_vocab_tensor_is_kept_for_backward():
    x, weight, targets = inputs()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = loss_module.linear_cross_entropy(x, weight, targets, chunk_rows=5)
    loss.backward()
    assert saved and all(shape.numel() <= max(N, V) * D for shape in saved), saved


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
@pytest.mark.parametrize("path", ["chunked", "whole"])
def test_model_loss_and_gradients_equal_the_full_logits_path(spec, path, monkeypatch):
    """forward(idx, targets) returns (None, loss); the loss and every parameter's gradient equal
    those of the cross-entropy taken over forward(idx)'s logits (a MoE's balancing loss: eval mode).
    Both paths leave the same parameters without a gradient: those that do not train (DeepSeek-V3's
    selection bias) and those eval mode skips (its multi-token prediction module). Logits larger than
    one chunk (here: LOSS_CHUNK_ELEMENTS made small) are chunked, and no logits are kept for backward;
    logits that fit in one chunk go through F.cross_entropy whole."""
    if path == "chunked":
        monkeypatch.setattr(spec.model, "LOSS_CHUNK_ELEMENTS", 64)
    model = randomize_(spec.build()).eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=g)
    targets = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=g)
    targets[0, :3] = -100
    saved = []  # what the forward keeps for backward: no (B, T, vocab_size) or (B*T, vocab_size) logits
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        logits, loss = model(idx, targets)
    assert logits is None and loss.shape == () and loss.dtype == torch.float32
    V = model.cfg.vocab_size
    if path == "chunked":
        assert not [s for s in saved if s[-1:] == (V,) and s.numel() >= idx.numel() * V], saved
    loss.backward()
    ours = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()  # grads back to None, so a parameter the second path skips shows as None
    logits, _ = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    without = sorted(name for name, grad in ours.items() if grad is None)
    assert without == sorted(name for name, p in model.named_parameters() if p.grad is None), (
        "grad-less parameters differ"
    )
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
