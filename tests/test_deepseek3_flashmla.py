"""FlashMLA in deepseek3's absorbed decoding: the model calls DeepSeek's kernel with the arguments its
interface documents (github.com/deepseek-ai/FlashMLA, flash_mla_interface.py) and gets the torch
path's answer back, and it falls back to the torch path wherever the kernel cannot run.

The kernel itself needs an SM90 GPU and a CUDA build of the flash_mla package: the last test runs
it against the torch path there and is skipped elsewhere. On CPU a stand-in with the kernel's
documented semantics (a paged cache gathered through block_table, cache_seqlens keys, a causal
mask aligned to the last key, values = the first head_dim_v columns of each key) takes its place,
so the paging, the lengths, the scale and the layout the model hands over are checked everywhere.
"""

import math

import pytest
import torch

from deepseek3 import model as ds3
from registry import by_name, randomize_


class FakeFlashMLA:
    """flash_mla's two decoding functions, in torch, as its interface documents them; records its calls."""

    def __init__(self):
        self.calls = []

    def get_mla_metadata(self, *args, **kwargs):
        return object(), None  # the newer releases' (FlashMLASchedMeta, None)

    def flash_mla_with_kvcache(
        self, q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits, softmax_scale, causal
    ):
        self.calls.append(dict(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens))
        B, T, H, D = q.shape
        assert k_cache.shape[1:] == (64, 1, D) and block_table.dtype == cache_seqlens.dtype == torch.int32
        out = torch.empty(B, T, H, head_dim_v, dtype=q.dtype)
        for b in range(B):
            n = int(cache_seqlens[b])
            keys = k_cache[block_table[b].long()].reshape(-1, D)[:n]  # (n, D): the sequence's pages, in order
            scores = torch.einsum("thd,sd->hts", q[b], keys) * softmax_scale  # (H, T, n)
            if causal:  # query t sees keys up to n - T + t
                scores = scores.masked_fill(~torch.ones(T, n, dtype=torch.bool).tril(n - T), -math.inf)
            out[b] = torch.einsum("hts,sv->thv", scores.softmax(-1), keys[:, :head_dim_v])
        return out, None


def decode_logits(model, idx, prompt_len):
    """Logits of a cached prefill of prompt_len tokens, then one token at a time: (B, T, vocab)."""
    with torch.inference_mode():
        cache = model.make_cache(idx.size(0), idx.size(1))
        steps = [model(idx[:, :prompt_len], cache=cache, pos=0)[0]]
        steps += [model(idx[:, t : t + 1], cache=cache, pos=t)[0] for t in range(prompt_len, idx.size(1))]
    return torch.cat(steps, dim=1), cache


@pytest.fixture
def model():
    return randomize_(by_name("deepseek3").build(block_size=160)).eval()


def test_kernel_path_is_called_as_documented_and_equals_the_torch_path(model, monkeypatch):
    # 2 sequences of 80 tokens: 2 pages each, the second partly filled
    idx = torch.randint(0, model.cfg.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    expected, _ = decode_logits(model, idx, prompt_len=70)  # the torch path: no flash_mla, a CPU model
    fake = FakeFlashMLA()
    monkeypatch.setattr(ds3, "flash_mla_module", lambda: fake)
    monkeypatch.setattr(ds3, "flash_mla_usable", lambda q, kv, rank: True)
    got, cache = decode_logits(model, idx, prompt_len=70)
    assert len(fake.calls) == model.cfg.n_layer * (1 + 80 - 70)  # every layer, the prefill and each step
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the kernel read the cache in place: its pages are the buffer itself, and sequence b owns its own pages
    call, buffer = fake.calls[-1], cache[-1].kv
    assert call["k_cache"].data_ptr() == buffer.data_ptr() and call["k_cache"].numel() == buffer.numel()
    assert call["block_table"].tolist() == [[0, 1], [2, 3]]
    assert call["cache_seqlens"].tolist() == [80, 80] and call["q"].shape[1] == 1
    assert fake.calls[0]["q"].shape[1] == 70  # the prefill's 70 queries in one call, under the causal mask


def test_cache_buffer_is_whole_kernel_pages(model):
    """FlashMLA reads pages of 64 tokens: the buffer is rounded up to them, the cache's limit is not."""
    cfg, cache = model.cfg, model.make_cache(3, 70)[0]
    new_token = torch.zeros(3, 1, cfg.kv_lora_rank), torch.zeros(3, 1, cfg.qk_rope_head_dim)
    assert cache.update(69, *new_token).shape == (3, 70, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert cache.kv.shape == (3, 128, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    with pytest.raises(ValueError, match="KV cache holds 70 positions; cannot write 1 at pos=70"):
        cache.update(70, *new_token)


def test_falls_back_to_torch_where_the_kernel_cannot_run(model, monkeypatch):
    """Without flash_mla (as in CI) decoding runs the torch path; a CPU tensor, fp32, other widths or a
    buffer that is not whole pages never take the kernel, even where the package imports."""
    monkeypatch.setattr(ds3, "flash_mla_attention", lambda *a: pytest.fail("the kernel path ran"))
    idx = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    got, _ = decode_logits(model, idx, prompt_len=3)
    with torch.inference_mode():
        torch.testing.assert_close(got, model(idx)[0], rtol=1e-4, atol=1e-4)

    monkeypatch.setattr(ds3, "flash_mla_module", lambda: FakeFlashMLA())
    kv = torch.zeros(2, 128, 576, dtype=torch.bfloat16)[:, :70]
    q = torch.zeros(2, 16, 1, 576, dtype=torch.bfloat16)
    assert not ds3.flash_mla_usable(q, kv, 512)  # on CPU
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert not ds3.flash_mla_usable(q.float().to(cuda), kv.float().to(cuda), 512)  # fp32
        assert not ds3.flash_mla_usable(q[..., :544].to(cuda), kv[..., :544].to(cuda), 480)  # other widths
        assert not ds3.flash_mla_usable(q.to(cuda), kv[:, :, :].to(cuda).contiguous(), 512)  # 70 rows: not pages


def sm90_with_flash_mla():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    return ds3.flash_mla_module() is not None


@pytest.mark.skipif(not sm90_with_flash_mla(), reason="needs an SM90 GPU (H100/H200) and the flash_mla package")
def test_flash_mla_kernel_equals_torch_path(monkeypatch):
    """The real kernel, at DeepSeek-V3's attention widths (16 heads, latent 512 + rope 64), bf16."""
    cfg = ds3.Config.from_preset("deepseek_v3_16b", n_layer=2, first_k_dense_replace=2, vocab_size=512, n_mtp=0)
    torch.manual_seed(0)
    model = randomize_(ds3.Transformer(cfg), std=cfg.n_embd**-0.5).to("cuda", torch.bfloat16).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 100), device="cuda")
    calls = []
    kernel = ds3.flash_mla_attention
    monkeypatch.setattr(ds3, "flash_mla_attention", lambda *a: calls.append(1) or kernel(*a))
    flash, _ = decode_logits(model, idx, prompt_len=70)
    assert len(calls) == 2 * 31
    monkeypatch.setattr(ds3, "flash_mla_usable", lambda q, kv, rank: False)
    torch_path, _ = decode_logits(model, idx, prompt_len=70)
    scale = torch_path.float().abs().max().item()
    assert (flash.float() - torch_path.float()).abs().max().item() <= 0.02 * scale
