"""GPT-2: the decoder-only transformer of "Language Models are Unsupervised Multitask Learners"
(Radford et al., 2019), itself GPT-1 (Radford et al., 2018) with pre-norm blocks, a final
LayerNorm and residual projections initialised with 1/sqrt(2 * n_layer).

Checked against Hugging Face `transformers.GPT2LMHeadModel` (tests/test_parity.py): logits
agree to 1e-4 in fp32, and checkpoints load both ways. The Hugging Face format (config.json,
weight names, safetensors) lives in hf.py beside this file, which holds the architecture only.

This file is the template of every other model in minllm: the same section order and names,
so `diff gpt2/model.py llama31/model.py` lists only what changed between the architectures.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    vocab_multiple: int = 1  # embedding/head rows padded to a multiple (64: aligned matmuls); padding never predicted
    block_size: int = 1024  # longest sequence; learned positions exist only up to here
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # residual stream width
    intermediate_size: int = 3072  # MLP hidden width (4 * n_embd in every GPT-2)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "math" (explicit softmax, the reference)
    init_std: float = 0.02  # std of the normal initialisation

    def __post_init__(self):
        for name in ("vocab_size", "vocab_multiple", "block_size", "n_layer", "n_head", "n_embd", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"Config.n_embd ({self.n_embd}) must be divisible by Config.n_head ({self.n_head})")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"Config.attn_impl must be 'sdpa' or 'math', got {self.attn_impl!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"Config.norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:  # rows of the embedding and the head: 50,304 for GPT-2's presets
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    # --- presets: looked up by exact name, never fuzzy-matched. The published sizes train from scratch
    # with 50,304 rows of embedding and head, as nanoGPT: 50,257 makes every loss matmul unaligned ---
    # fmt: off

    @classmethod
    def tiny(cls):  # the CPU default: learns Shakespeare's bytes (257 ids, see shared/tokenizer.py) in a minute or two
        return cls(vocab_size=257, block_size=256, n_layer=4, n_head=4, n_embd=128, intermediate_size=512)

    @classmethod
    def gpt2(cls):  # 124M
        return cls(n_layer=12, n_head=12, n_embd=768, intermediate_size=3072, vocab_multiple=64)

    @classmethod
    def gpt2_medium(cls):  # 355M
        return cls(n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096, vocab_multiple=64)

    @classmethod
    def gpt2_large(cls):  # 774M
        return cls(n_layer=36, n_head=20, n_embd=1280, intermediate_size=5120, vocab_multiple=64)

    @classmethod
    def gpt2_xl(cls):  # 1558M
        return cls(n_layer=48, n_head=25, n_embd=1600, intermediate_size=6400, vocab_multiple=64)

    PRESETS = ("tiny", "gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl")
    # fmt: on

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**{**asdict(getattr(cls, name)()), **overrides})


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
        self.n_head, self.head_dim, self.attn_impl = cfg.n_head, cfg.head_dim, cfg.attn_impl
        self.wq = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cache=None, pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.wk(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, n_head, pos+T, head_dim)
        y = causal_attention(q, k, v, pos, self.attn_impl)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_embd)
        return self.wo(y)


# -----------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.intermediate_size)  # fc
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.n_embd)  # proj

    def forward(self, x):
        # GPT-2 used the tanh approximation of GELU (Hendrycks & Gimpel, 2016, sec. 2)
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


# -----------------------------------------------------------------------------
# Block


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), cache, pos)
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
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)  # ids past vocab_size never occur
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self):
        """Tables computed from cfg, never saved, rebuilt after to_empty: GPT-2 has none, its positions
        are learned."""

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
        positions = torch.arange(pos, pos + idx.size(1), device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, n_embd)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i], pos)
        # with targets: (None, loss), the logits never materialised (LMHead's chunked cross-entropy, a
        # () float32 mean over the targets that are not -100); without: (logits (B, T, vocab_size), None)
        x = self.norm(x)
        logits, loss = (self.lm_head(x), None) if targets is None else (None, self.lm_head(x, targets))
        return logits, loss

    def make_cache(self, batch_size, max_seq_len=None):
        cfg = self.cfg
        max_seq_len = max_seq_len or cfg.block_size
        return [KVCache(batch_size, max_seq_len, cfg.n_head, cfg.head_dim) for _ in range(cfg.n_layer)]

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
        cfg = self.cfg
        n = sum(p.numel() for p in self.parameters())  # a tied matrix is counted once
        n -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd * (1 if cfg.tie_embeddings else 2)  # padding
        if non_embedding:
            n -= cfg.vocab_size * cfg.n_embd + self.pos_emb.weight.numel()
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

if __name__ == "__main__":  # smoke check: python gpt2/model.py
    torch.manual_seed(0)
    model = Transformer(Config.tiny())
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    logits, loss = model(idx)[0], model(idx, idx)[1]
    print(
        f"tiny GPT-2: {model.num_params():,} params, logits {tuple(logits.shape)}, loss {loss.item():.3f} "
        f"(ln vocab = {math.log(model.cfg.vocab_size):.3f})"
    )
    print("generated ids:", model.generate(idx[:1, :4], 8, temperature=0).tolist())
