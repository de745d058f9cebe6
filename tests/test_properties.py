"""Hypothesis properties every model must have: shapes, causality, batch independence, loss,
KV-cache decoding equal to the full forward, and the fused attention equal to the explicit one."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import MODELS, by_name

SETTINGS = settings(max_examples=8, deadline=None)
models = pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)


def model_for(spec, attn_impl="sdpa", **overrides):
    return _build(spec.name, attn_impl, tuple(sorted(overrides.items())))


@functools.cache
def _build(name, attn_impl, overrides):
    spec = by_name(name)
    return spec.build(seed=0, attn_impl=attn_impl, **dict(overrides)).eval()


def ids(data, vocab_size, batch, seq_len):
    flat = data.draw(st.lists(st.integers(0, vocab_size - 1), min_size=batch * seq_len, max_size=batch * seq_len))
    return torch.tensor(flat).view(batch, seq_len)


@models
@SETTINGS
@given(data=st.data(), batch=st.integers(1, 3), seq_len=st.integers(1, 20))
def test_shapes_and_loss(spec, data, batch, seq_len):
    # a mixture-of-experts model adds its load-balancing loss to the training loss: switched off here
    no_aux = {"router_aux_loss_coef": 0.0} if hasattr(spec.config(), "router_aux_loss_coef") else {}
    model = model_for(spec, **no_aux)
    idx, targets = ids(data, model.cfg.vocab_size, batch, seq_len), ids(data, model.cfg.vocab_size, batch, seq_len)
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert logits.shape == (batch, seq_len, model.cfg.vocab_size)
    assert loss.shape == ()
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


@models
@SETTINGS
@given(data=st.data(), seq_len=st.integers(2, 20))
def test_causality(spec, data, seq_len):
    """Changing token t changes no logits before t."""
    model = model_for(spec)
    idx = ids(data, model.cfg.vocab_size, 1, seq_len)
    t = data.draw(st.integers(0, seq_len - 1))
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t:], b[:, t:])  # and the change is seen from t on


@models
@SETTINGS
@given(data=st.data(), batch=st.integers(2, 4), seq_len=st.integers(1, 16))
def test_batch_independence(spec, data, batch, seq_len):
    model = model_for(spec)
    idx = ids(data, model.cfg.vocab_size, batch, seq_len)
    with torch.no_grad():
        together, _ = model(idx)
        alone = torch.cat([model(idx[i : i + 1])[0] for i in range(batch)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


@models
@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@SETTINGS
@given(data=st.data(), prompt_len=st.integers(1, 12), new=st.integers(1, 10))
def test_kv_cache_decoding_equals_full_forward(spec, attn_impl, data, prompt_len, new):
    """Prefill a prompt, then feed tokens one at a time: every step's logits equal the full forward's."""
    model = model_for(spec, attn_impl)
    idx = ids(data, model.cfg.vocab_size, 2, prompt_len + new)
    cache = model.make_cache(2, prompt_len + new)
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model(idx[:, :prompt_len], cache=cache, pos=0)[0]]
        for p in range(prompt_len, prompt_len + new):
            steps.append(model(idx[:, p : p + 1], cache=cache, pos=p)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


@models
@SETTINGS
@given(data=st.data(), seq_len=st.integers(1, 24))
def test_sdpa_equals_explicit_softmax(spec, data, seq_len):
    fused, explicit = model_for(spec, "sdpa"), model_for(spec, "math")
    idx = ids(data, fused.cfg.vocab_size, 2, seq_len)
    with torch.no_grad():
        torch.testing.assert_close(fused(idx)[0], explicit(idx)[0], rtol=0, atol=1e-5)


@models
def test_generate_greedy_matches_argmax_of_full_forward(spec):
    model = model_for(spec)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    torch.testing.assert_close(out[:, 5:], logits[:, 4:].argmax(-1), rtol=0, atol=0)
