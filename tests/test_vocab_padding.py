"""A vocabulary padded for aligned matmuls (GPT-2's Config.vocab_multiple: 50,257 ids in 50,304
rows of embedding and head): the padding rows are never predicted. The loss, its gradients and the
logits equal those of the unpadded model on the same weights, generation never samples a padding
id, and the Hugging Face export drops the rows, loading back as the unpadded model."""

import pytest
import torch
import torch.nn.functional as F

from gpt2.model import Config, Transformer, linear_cross_entropy
from registry import by_name, randomize_

SPEC = by_name("gpt2")
MULTIPLE = 64  # the small model's 97 ids padded to 128 rows


def padded_and_unpadded(tie_embeddings=True):
    """The small GPT-2 padded, its padding rows made large (they would win every softmax if they
    counted), and the unpadded model holding the same weights for the real ids."""
    padded = randomize_(SPEC.build(vocab_multiple=MULTIPLE, tie_embeddings=tie_embeddings))
    V = padded.cfg.vocab_size
    with torch.no_grad():
        padded.tok_emb.weight[V:] = 5.0
        padded.lm_head.weight[V:] = 5.0
    unpadded = SPEC.build(tie_embeddings=tie_embeddings)
    rows = ("tok_emb.weight", "lm_head.weight")
    unpadded.load_state_dict({k: v[:V] if k in rows else v for k, v in padded.state_dict().items()})
    return padded, unpadded


def batch(vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (2, 9), generator=g)
    targets = torch.randint(0, vocab_size, (2, 9), generator=g)
    targets[0, :3] = -100
    return idx, targets


def test_gpt2_presets_are_padded_and_tiny_is_not():
    for name in ("gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl"):
        cfg = Config.from_preset(name)
        assert (cfg.vocab_size, cfg.padded_vocab_size) == (50257, 50304)
    assert Config.tiny().padded_vocab_size == Config.tiny().vocab_size
    with torch.device("meta"):
        model = Transformer(Config.gpt2())
    assert model.tok_emb.weight.shape[0] == model.lm_head.weight.shape[0] == 50304


@pytest.mark.parametrize("chunk_rows", [5, None])  # chunked, and one F.cross_entropy
def test_loss_leaves_the_padding_rows_out(chunk_rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g)  # 31 ids + 9 padding rows
    weight[31:] = 5.0
    weight.requires_grad_()
    targets = torch.randint(0, 31, (23,), generator=g)
    loss = linear_cross_entropy(x, weight, targets, chunk_rows=chunk_rows, vocab_size=31)
    loss.backward()
    grad_x, grad_w = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    expected = F.cross_entropy(F.linear(x, weight[:31]), targets)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_w, weight.grad, rtol=1e-6, atol=1e-6)
    assert grad_w[31:].abs().max() == 0


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_padded_model_equals_unpadded_on_the_same_weights(tie_embeddings):
    padded, unpadded = padded_and_unpadded(tie_embeddings)
    V = padded.cfg.vocab_size
    assert padded.lm_head.weight.size(0) == 128 and padded.num_params() == unpadded.num_params()
    idx, targets = batch(V)
    torch.testing.assert_close(padded(idx)[0], unpadded(idx)[0], rtol=1e-6, atol=1e-6)  # (B, T, vocab_size)
    padded(idx, targets)[1].backward()
    unpadded(idx, targets)[1].backward()
    for (name, p), q in zip(padded.named_parameters(), unpadded.parameters()):
        torch.testing.assert_close(p.grad[: q.size(0)], q.grad, rtol=1e-6, atol=1e-7, msg=name)
        assert p.grad[q.size(0) :].abs().sum() == 0, f"{name}: the padding rows got a gradient"


def test_padding_ids_are_never_sampled():
    padded, _ = padded_and_unpadded()
    V = padded.cfg.vocab_size
    prompt = torch.randint(0, V, (8, 4), generator=torch.Generator().manual_seed(0))
    out = padded.generate(prompt, 16, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert out.max() < V
    assert padded.generate(prompt, 4, temperature=0).max() < V


def test_export_drops_the_padding_and_loads_back_unpadded(tmp_path):
    padded, _ = padded_and_unpadded()
    padded.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.cfg.padded_vocab_size == loaded.cfg.vocab_size == padded.cfg.vocab_size
    idx, _ = batch(padded.cfg.vocab_size)
    torch.testing.assert_close(loaded(idx)[0], padded(idx)[0], rtol=1e-6, atol=1e-6)
