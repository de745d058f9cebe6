"""LLaMA 3.1: the decoder of "The Llama 3 Herd of Models" (Grattafiori et al., 2024), which is
LLaMA (Touvron et al., 2023) with grouped-query attention at every size, a 128K-token vocabulary
and RoPE frequencies rescaled for a 128K context. Llama 3.2 1B and 3B (pruned and distilled from
3.1) are the same architecture with tied embeddings.

Checked against Hugging Face `transformers.LlamaForCausalLM` (tests/test_parity.py): logits
agree to 1e-4 in fp32, and checkpoints load both ways. The Hugging Face format (config.json,
weight names, safetensors) lives in hf.py beside this file, which holds the architecture only.

Changes from gpt2/model.py:
- RMSNorm (Zhang & Sennrich, 2019) instead of LayerNorm, and no biases anywhere;
- rotary position embeddings (Su et al., 2021) with Llama 3.1's frequency scaling, or YaRN's
  (Peng et al., 2023; `rope_type`), instead of learned positions (`precompute_rope`, `apply_rope`);
- grouped-query attention (Ainslie et al., 2023): n_kv_heads < n_head, so the KV cache shrinks;
- SwiGLU MLP (Shazeer, 2020) with three matrices, sized by `ffn_hidden_size`;
- untied embeddings for 3.1 8B/70B/405B (hf.py: Hugging Face names with separate q/k/v projections).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


def ffn_hidden_size(n_embd, multiple_of, ffn_dim_multiplier=None):
    # LLaMA's SwiGLU width: 2/3 of 4 * n_embd keeps a 4x MLP's parameter count with three matrices
    # instead of two (Shazeer, 2020, sec. 2); Llama 3 scales that and rounds up to multiple_of
    hidden = int(2 * 4 * n_embd / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class Config:
    vocab_size: int = 128256  # Llama 3 tiktoken BPE: 128,000 tokens + 256 reserved special tokens
    block_size: int = 131072  # longest sequence: the 128K context of Llama 3.1
    n_layer: int = 32  # transformer blocks
    n_head: int = 32  # query heads
    n_kv_heads: int = 8  # key/value heads, each shared by n_head // n_kv_heads query heads
    n_embd: int = 4096  # residual stream width
    intermediate_size: int = 14336  # SwiGLU hidden width, from ffn_hidden_size
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # lm_head shares the token-embedding matrix (Llama 3.2 1B/3B)
    rope_theta: float = 500000.0  # RoPE base, raised from LLaMA's 10,000 (herd paper sec. 3.2)
    rope_factor: float | None = 8.0  # RoPE scaling: context extension factor s; None = plain RoPE
    rope_type: str = "llama3"  # the scaling rope_factor selects: "llama3" (Llama 3.1's) or "yarn" (YaRN)
    rope_original_block_size: int = 8192  # the pre-training context, before long-context training
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths > rope_original_block_size / this: fully scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths < rope_original_block_size / this: unchanged
    rope_beta_fast: float = 32.0  # yarn: frequencies turning more often than this in the original context: kept
    rope_beta_slow: float = 1.0  # yarn: turning less often than this: divided by rope_factor; a ramp between
    rope_attention_factor: float | None = None  # yarn: multiplies cos and sin; None = 0.1 ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole frequency indices (transformers' default)
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "math" (explicit softmax, the reference)
    init_std: float = 0.02  # std of the normal initialisation

    def __post_init__(self):
        for name in (
            "vocab_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_kv_heads",
            "n_embd",
            "intermediate_size",
            "rope_original_block_size",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"Config.n_embd ({self.n_embd}) must be divisible by Config.n_head ({self.n_head})")
        if self.n_head % self.n_kv_heads != 0:
            raise ValueError(
                f"Config.n_head ({self.n_head}) must be divisible by Config.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = Config.n_embd // Config.n_head ({self.head_dim}) must be even for RoPE")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"Config.attn_impl must be 'sdpa' or 'math', got {self.attn_impl!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"Config.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_factor is not None and not self.rope_factor > 0:
            raise ValueError(f"Config.rope_factor must be > 0 or None (no scaling), got {self.rope_factor!r}")
        if self.rope_type not in ("llama3", "yarn"):
            raise ValueError(f"Config.rope_type must be 'llama3' or 'yarn', got {self.rope_type!r}")
        if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(
                f"Config.rope_low_freq_factor ({self.rope_low_freq_factor}) must be > 0 and below "
                f"Config.rope_high_freq_factor ({self.rope_high_freq_factor})"
            )
        if not 0 < self.rope_beta_slow <= self.rope_beta_fast:
            raise ValueError(
                f"Config.rope_beta_slow ({self.rope_beta_slow}) must be > 0 and at most "
                f"Config.rope_beta_fast ({self.rope_beta_fast})"
            )
        if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
            raise ValueError(f"Config.rope_attention_factor must be > 0 or None, got {self.rope_attention_factor!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # --- presets: looked up by exact name, never fuzzy-matched ---
    # fmt: off

    @classmethod
    def tiny(cls):  # the CPU default: gpt2's tiny, with the byte tokenizer's 257 ids
        return cls(vocab_size=257, block_size=256, n_layer=4, n_head=4, n_kv_heads=2, n_embd=128,
                   intermediate_size=ffn_hidden_size(128, multiple_of=32), tie_embeddings=True)

    # ffn_dim_multiplier and multiple_of as in Meta's params.json for each model
    @classmethod
    def llama31_8b(cls):  # 8.03B
        return cls(n_layer=32, n_head=32, n_kv_heads=8, n_embd=4096, intermediate_size=ffn_hidden_size(4096, 1024, 1.3))

    @classmethod
    def llama31_70b(cls):  # 70.6B
        return cls(n_layer=80, n_head=64, n_kv_heads=8, n_embd=8192, intermediate_size=ffn_hidden_size(8192, 4096, 1.3))

    @classmethod
    def llama31_405b(cls):  # 405.9B
        return cls(n_layer=126, n_head=128, n_kv_heads=8, n_embd=16384,
                   intermediate_size=ffn_hidden_size(16384, 4096, 1.2))

    @classmethod
    def llama32_1b(cls):  # 1.24B; Llama 3.2 stretches RoPE 32x instead of 8x
        return cls(n_layer=16, n_head=32, n_kv_heads=8, n_embd=2048, intermediate_size=ffn_hidden_size(2048, 256, 1.5),
                   tie_embeddings=True, rope_factor=32.0)

    @classmethod
    def llama32_3b(cls):  # 3.21B
        return cls(n_layer=28, n_head=24, n_kv_heads=8, n_embd=3072, intermediate_size=ffn_hidden_size(3072, 256, 1.0),
                   tie_embeddings=True, rope_factor=32.0)

    PRESETS = ("tiny", "llama31_8b", "llama31_70b", "llama31_405b", "llama32_1b", "llama32_3b")
    # fmt: on

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**{**asdict(getattr(cls, name)()), **overrides})


# -----------------------------------------------------------------------------
# RMSNorm


class RMSNorm(nn.Module):
    # LayerNorm without the mean subtraction and the bias (Zhang & Sennrich, 2019): x / RMS(x) * g
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 and cast back before the gain, as Hugging Face does, so bf16 matches
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# -----------------------------------------------------------------------------
# Rotary position embedding (RoFormer, Su et al., 2021)


def precompute_rope(cfg: Config):
    """cos and sin of the rotation angle m * theta_i for every position m < block_size, both times
    YaRN's attention factor (1 for other RoPE)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (head_dim/2,) eq. 15
    attention_factor = 1.0
    if cfg.rope_factor is not None and cfg.rope_type == "llama3":
        # Llama 3.1 (Meta's llama-models, apply_scaling): frequencies whose wavelength exceeds the
        # original context / low_freq_factor are divided by rope_factor (position interpolation,
        # Chen et al., 2023), those shorter than context / high_freq_factor are kept, and between the
        # two the result blends linearly in (turns per original context) = context / wavelength
        turns = cfg.rope_original_block_size / (2 * math.pi / inv_freq)  # (head_dim/2,)
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        smooth = ((turns - lo) / (hi - lo)).clamp(0, 1)  # 0: fully scaled ... 1: unchanged
        inv_freq = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    if cfg.rope_factor is not None and cfg.rope_type == "yarn":
        inv_freq, attention_factor = yarn_scaling(inv_freq, cfg)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)  # (block_size, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, head_dim): dim i pairs with i + head_dim/2
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def yarn_scaling(inv_freq, cfg: Config):
    """YaRN (Peng et al., 2023): inv_freq (head_dim/2,) -> (scaled inv_freq, attention factor).

    NTK-by-parts (sec. 3.2): frequency i turns r_i = L / wavelength_i times over the original context
    L. Those with r_i > beta_fast are kept (extrapolated), those with r_i < beta_slow are divided by
    the factor s (interpolated, as position interpolation does), and between the two the result
    blends linearly in the index i, as the reference implementation does. Attention temperature
    (sec. 3.4): logits are scaled by 1/t with sqrt(1/t) = 0.1 ln(s) + 1, applied as a factor on both
    cos and sin, hence on q and k."""
    d, L, s = cfg.head_dim, cfg.rope_original_block_size, cfg.rope_factor

    def index_turning(r):  # the (fractional) i with r_i = r: L / (2 pi theta^(2i/d)) = r
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(cfg.rope_theta))

    lo, hi = index_turning(cfg.rope_beta_fast), index_turning(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    # clamped as the reference does, hi to d - 1 rather than d/2 - 1 (were lo itself past d - 1, the ramp
    # would invert; no real config comes near: the slowest frequency would turn > beta_fast times in L)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001  # as the reference: keeps the ramp a step, not a division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)  # 0: kept ... 1: divided by s
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / s) * ramp
    attention_factor = cfg.rope_attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv_freq, attention_factor


def apply_rope(x, cos, sin):
    """Rotate x: (B, n_heads, T, head_dim) by RoFormer eq. 34, x * cos + rotate_half(x) * sin, with
    cos, sin: (T, head_dim) the rows of x's positions. Dim i pairs with i + head_dim/2 rather than
    the paper's neighbours 2i, 2i+1: the layout of Hugging Face's Llama weights, so they load unpermuted."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # a no-op unless autocast made x lower precision
    x1, x2 = x.chunk(2, dim=-1)  # (B, n_heads, T, head_dim/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# -----------------------------------------------------------------------------
# KV cache: allocated only for generation, written at `pos`


class KVCache(nn.Module):
    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim):
        super().__init__()
        self.shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        # allocated by the first update, in the dtype and on the device of the keys it is given: what
        # attention computes in (bf16 under autocast or FSDP's mixed precision), not the stored weights' fp32
        self.register_buffer("k", None, persistent=False)
        self.register_buffer("v", None, persistent=False)

    def update(self, pos, k, v):
        # k, v: (B, n_kv_heads, T, head_dim) for positions pos .. pos+T-1
        T = k.size(2)
        if pos + T > self.shape[2]:
            raise ValueError(f"KV cache holds {self.shape[2]} positions; cannot write {T} at pos={pos}")
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]  # (B, n_kv_heads, pos+T, head_dim)


# -----------------------------------------------------------------------------
# Attention


def causal_attention(q, k, v, pos, impl):
    """softmax(q k^T / sqrt(d) + causal mask) v, for queries at positions pos .. pos+T-1.

    q: (B, n_head, T, head_dim); k, v: (B, n_kv_heads, pos+T, head_dim). With grouped-query
    attention each key/value head serves n_head // n_kv_heads query heads.
    """
    T, S = q.size(2), k.size(2)
    gqa = k.size(1) != q.size(1)
    if impl == "sdpa" and T == S:  # no cache prefix: the fused kernel builds the causal mask itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # query i (at position pos + i) sees keys 0 .. pos + i; one new token sees every key: no mask
    mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if impl == "sdpa":  # the kernel shares k/v heads itself, without copying the cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, n_head, S, head_dim)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, n_head, T, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    return att @ v  # (B, n_head, T, head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = cfg.n_head, cfg.n_kv_heads, cfg.head_dim
        self.attn_impl = cfg.attn_impl
        self.wq = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate before caching
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, n_kv_heads, pos+T, head_dim)
        y = causal_attention(q, k, v, pos, self.attn_impl)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_embd)
        return self.wo(y)


# -----------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)  # down
        self.w3 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)  # up

    def forward(self, x):
        # SwiGLU (Shazeer, 2020, eq. 6): a SiLU-activated gate times a linear "up" projection
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# -----------------------------------------------------------------------------
# Block


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        x = x + self.mlp(self.mlp_norm(x))
        return x


# -----------------------------------------------------------------------------
# Output head and loss: cross-entropy without the (B*T, vocab_size) logits

# One chunk of the loss's fp32 logits holds at most this many elements (128 MiB): 256 rows at Llama 3's
# vocabulary of 128,256, 640 at GPT-2's padded 50,304. Large enough for matmuls that fill a GPU, small
# enough that a chunk is 1/16 of a 4,096-token sequence's logits. Logits that fit in one chunk are not chunked.
LOSS_CHUNK_ELEMENTS = 2**25


def loss_chunk_rows(vocab_rows):
    """Rows per chunk of the loss for a head of vocab_rows rows: the most whose fp32 logits fit in
    LOSS_CHUNK_ELEMENTS, in whole tiles of 128 rows (aligned matmuls), and at least one tile."""
    return max(128, LOSS_CHUNK_ELEMENTS // vocab_rows // 128 * 128)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight^T against targets, a block of rows at a time.
    Forward keeps only each row's log-sum-exp; backward recomputes a chunk's logits to get its
    gradient softmax - onehot(target), so no (N, vocab_size) tensor ever exists. The logits are
    computed in the dtype of x and weight and reduced in float32, as F.cross_entropy(logits.float()).
    Rows of weight past vocab_size are padding: their logits are left out, and they get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, ignore_index, vocab_size):
        # x: (N, n_embd), weight: (rows >= vocab_size, n_embd), targets: (N,) with ignore_index rows left out
        total, lse = torch.zeros((), dtype=torch.float32, device=x.device), []
        for s in range(0, x.size(0), chunk_rows):
            logits = (x[s : s + chunk_rows] @ weight.T)[:, :vocab_size].float()  # (C, vocab_size)
            t = targets[s : s + chunk_rows]
            lse.append(torch.logsumexp(logits, dim=-1))  # (C,)
            target_logit = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)  # (C,)
            total += torch.where(t != ignore_index, lse[-1] - target_logit, 0.0).sum()
        n_valid = (targets != ignore_index).sum()  # all ignored: 0 / 0 = nan, as F.cross_entropy
        ctx.save_for_backward(x, weight, targets, torch.cat(lse), n_valid)
        ctx.chunk_rows, ctx.ignore_index, ctx.vocab_size = chunk_rows, ignore_index, vocab_size
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, lse, n_valid = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        # accumulated chunk by chunk in place, in weight's dtype: exact in fp32; under bf16, one
        # rounding per chunk (a (vocab_size, n_embd) fp32 temporary per chunk would cost more memory)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        scale = grad_loss.float() / n_valid
        for s in range(0, x.size(0), ctx.chunk_rows):
            xc, t = x[s : s + ctx.chunk_rows], targets[s : s + ctx.chunk_rows]
            g = (xc @ weight.T).float()  # (C, rows): the logits again
            g.sub_(lse[s : s + ctx.chunk_rows, None]).exp_()  # softmax
            if ctx.vocab_size < g.size(1):
                g[:, ctx.vocab_size :] = 0.0  # the padding, never predicted, has no probability
            rows = torch.arange(t.size(0), device=t.device)
            g[rows, t.clamp(min=0)] -= 1.0  # d loss_i / d logits_i = softmax_i - onehot(t_i)
            g.mul_(torch.where(t != ctx.ignore_index, scale, 0.0)[:, None])
            g = g.to(x.dtype)
            if grad_x is not None:
                grad_x[s : s + ctx.chunk_rows] = g @ weight  # (C, n_embd)
            if grad_w is not None:
                grad_w.addmm_(g.T, xc)  # (rows, n_embd)
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy(x, weight, targets, chunk_rows=None, ignore_index=-100, vocab_size=None):
    """F.cross_entropy(F.linear(x, weight)[..., :vocab_size].float().flatten(0, -2), targets.flatten(),
    ignore_index=-100) in value and gradients (for x and weight, tied or not), holding one chunk of
    logits at a time. x: (..., n_embd), targets: (...) -> () float32. Rows of weight past vocab_size
    (default: none) are padding for aligned matmuls, never predicted. Without chunk_rows, logits that fit
    in one chunk are computed at once by F.linear and F.cross_entropy, which compile to fused kernels and
    need no recomputation in backward; larger ones in chunks of loss_chunk_rows rows. Under autocast, x
    and weight enter in its dtype, as F.linear's would; the casts stay outside the Function, so their
    gradients flow back through them."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x, weight = x.to(torch.get_autocast_dtype(device)), weight.to(torch.get_autocast_dtype(device))
    x, targets, vocab_size = x.flatten(0, -2), targets.flatten(), vocab_size or weight.size(0)
    with torch.autocast(device, enabled=False):  # the backward runs without autocast too
        if chunk_rows is None and x.size(0) * weight.size(0) <= LOSS_CHUNK_ELEMENTS:
            logits = F.linear(x, weight)[:, :vocab_size].float()  # (N, vocab_size)
            return F.cross_entropy(logits, targets, ignore_index=ignore_index)
        chunk_rows = chunk_rows or loss_chunk_rows(weight.size(0))
        return ChunkedCrossEntropy.apply(x, weight, targets, chunk_rows, ignore_index, vocab_size)


class LMHead(nn.Linear):
    """The output projection, bias-free. head(x) gives the logits; head(x, targets) gives the mean
    cross-entropy through linear_cross_entropy instead, never holding the logits. The loss is
    computed in this module's forward, not from its weight outside, so what wraps module calls
    (FSDP's all-gather of a sharded lm_head, its reshard and gradient reduction) sees it. A head of
    padded_vocab_size rows (aligned matmuls) predicts only the first vocab_size: the logits it returns
    and those the loss reduces leave the padding rows out."""

    def __init__(self, n_embd, vocab_size, padded_vocab_size=None):
        super().__init__(n_embd, padded_vocab_size or vocab_size, bias=False)
        self.vocab_size = vocab_size

    def forward(self, x, targets=None):
        if targets is None:
            return super().forward(x)[..., : self.vocab_size]  # (..., vocab_size)
        return linear_cross_entropy(x, self.weight, targets, vocab_size=self.vocab_size)


# -----------------------------------------------------------------------------
# Transformer


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self):
        """Tables computed from cfg, never saved, rebuilt after to_empty: RoPE's cos and sin."""
        cos, sin = precompute_rope(self.cfg)  # (block_size, head_dim) each
        device = self.tok_emb.weight.device  # built on the meta device, these are too
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def reset_parameters(self):
        for name, p in self.named_parameters():  # a tied matrix once, in a fixed order
            self.init_parameter(name, p)

    def init_parameter(self, name, p):
        """Write parameter `name`'s initial value into p, any tensor of its shape: train.py passes a
        full-size scratch tensor when each process holds only a shard of the parameter."""
        std = self.cfg.init_std
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")):
            # GPT-2 paper sec. 2.3: scale residual projections by 1/sqrt(N) so the
            # residual stream's variance does not grow with depth (2 per block)
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
        else:
            nn.init.normal_(p, mean=0.0, std=std)

    def check_input(self, idx, pos=0, training_step=False):
        """Fail with a message a user can act on, instead of an index error deep inside torch. In a
        training step (training mode, targets given) the token ids are checked without a host sync."""
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"idx must be an integer tensor of shape (batch, seq_len), got {tuple(idx.shape)} {idx.dtype}"
            )
        if pos + idx.size(1) > self.cfg.block_size:
            raise ValueError(
                f"sequence of {pos + idx.size(1)} tokens (pos={pos} + {idx.size(1)} new) is longer than "
                f"the model supports (block_size={self.cfg.block_size})"
            )
        outside = (idx < 0) | (idx >= self.cfg.vocab_size)
        if training_step or torch.compiler.is_compiling():
            # no host sync: the device checks the ids and fails without naming one. A training step's ids come
            # from the data loader, which checked each shard; a compiled graph cannot raise a ValueError
            torch._assert_async(~outside.any(), f"token ids outside the vocabulary [0, {self.cfg.vocab_size})")
        elif outside.any():  # one host sync per forward; the details are read only on failure
            raise ValueError(f"token id {idx[outside][0].item()} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def forward(self, idx, targets=None, *, cache=None, pos=0, aux=None):
        """idx: (B, T) token ids at positions pos .. pos+T-1; cache: list of KVCache, one per layer."""
        # aux: None, or a dict this call fills with training statistics of this forward (none in dense models)
        self.check_input(idx, pos, training_step=self.training and targets is not None)
        x = self.tok_emb(idx)  # (B, T, n_embd); positions enter only through RoPE in attention
        T = idx.size(1)
        # (T, head_dim) each: the rows of these positions, sliced once for all layers
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache[i], pos)
        # with targets: (None, loss), the logits never materialised (LMHead's chunked cross-entropy, a
        # () float32 mean over the targets that are not -100); without: (logits (B, T, vocab_size), None)
        x = self.norm(x)
        logits, loss = (self.lm_head(x), None) if targets is None else (None, self.lm_head(x, targets))
        return logits, loss

    def make_cache(self, batch_size, max_seq_len=None):
        cfg = self.cfg
        max_seq_len = max_seq_len or cfg.block_size
        return [KVCache(batch_size, max_seq_len, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layer)]

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after the prompt idx (B, T); temperature 0 means greedy."""
        if idx.size(1) + max_new_tokens > self.cfg.block_size:
            raise ValueError(
                f"prompt of {idx.size(1)} tokens + {max_new_tokens} new tokens exceeds block_size={self.cfg.block_size}"
            )
        # inference_mode, not no_grad: it also skips autograd's version counters and view tracking,
        # a per-op cost that dominates decoding small models one token at a time
        with torch.inference_mode():
            cache = self.make_cache(idx.size(0), idx.size(1) + max_new_tokens)
            logits, _ = self(idx, cache=cache, pos=0)  # prefill the whole prompt at once
            out = [idx]
            for step in range(max_new_tokens):
                next_id = sample(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
                out.append(next_id)
                if step + 1 < max_new_tokens:
                    logits, _ = self(next_id, cache=cache, pos=idx.size(1) + step)
        return torch.cat(out, dim=1)  # outside inference_mode: an ordinary tensor, fine to train on (RL)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # a tied matrix is counted once
        if non_embedding:
            # the embedding lookup does no matmul; an untied lm_head does, so it stays counted
            # (the convention of torchtitan's FLOP count; tied, the one matrix is the embedding)
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        # 6N for the matmuls (forward 2N + backward 4N) plus attention's q k^T and att v:
        # 2 * 2 * n_layer * seq_len * n_head * head_dim forward, x3 with backward
        # (Kaplan et al. 2020, table 1; PaLM appendix B). The output projection is a matmul even
        # when it shares its matrix with the embedding lookup, so a tied lm_head counts too.
        cfg = self.cfg
        n_matmul = self.num_params(non_embedding=True) + (self.lm_head.weight.numel() if cfg.tie_embeddings else 0)
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints: the format is in hf.py, imported late because it imports this file

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a Hugging Face directory (config.json + safetensors); overrides replace Config fields. A path
        without one (missing, a hub name not yet downloaded, another architecture's) raises hf.CheckpointError."""
        from . import hf

        return hf.load(path, **overrides)

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30):
        """Save as a Hugging Face directory, in safetensors shards of at most max_shard_bytes."""
        from . import hf

        hf.save(self, path, max_shard_bytes)


def sample(logits, temperature, top_k, generator=None):
    """logits: (B, vocab_size) -> next ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


# -----------------------------------------------------------------------------

if __name__ == "__main__":  # smoke check: python llama31/model.py
    torch.manual_seed(0)
    model = Transformer(Config.tiny())
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    logits, loss = model(idx)[0], model(idx, idx)[1]
    print(
        f"tiny Llama 3.1: {model.num_params():,} params, logits {tuple(logits.shape)}, loss {loss.item():.3f} "
        f"(ln vocab = {math.log(model.cfg.vocab_size):.3f})"
    )
    print("generated ids:", model.generate(idx[:1, :4], 8, temperature=0).tolist())
