"""The models: one entry per architecture (or variant), naming its package and the settings every
user of the list needs. posttrain/ and bench/ take their --model choices from MODELS; every test
family is parametrized over it (tests/registry.py adds the test-only helpers), so a new model gets
the post-training files, the benchmarks and the whole suite by adding one entry here. This is the
list of model packages, not model code: each entry's model, hf and train modules are imported on use."""

import importlib
from dataclasses import dataclass, field

# bench/'s default CPU run: the model's tiny preset with a 4,096-token vocabulary. At GPT-2's
# 50,257 a CPU training step is ~80% vocabulary projection and cross-entropy, the same two kernels
# on both sides, and a ratio against transformers would say little about the model code.
BENCH_CPU = dict(vocab_size=4096)
# bench/ --quick: a few-second smoke run, whose printed checks tests/test_bench.py asserts. Untied:
# on random weights a tied model's greedy continuation soon repeats one token, which hides bugs.
BENCH_QUICK = dict(
    vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64, intermediate_size=128, tie_embeddings=False
)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # test id and bench/ --model name
    package: str  # folder holding model.py and train.py
    small: dict  # Config overrides for a tiny random model (properties, cache, training)
    hf_class: str  # the transformers oracle (and bench/'s twin), e.g. "GPT2LMHeadModel"
    hf_config: dict = field(default_factory=dict)  # transformers config kwargs: odd sizes for parity
    parity_seq_len: int = 24  # long enough to exercise what the config scales (e.g. RoPE)
    presets: dict = field(default_factory=dict)  # preset -> published parameter count
    preset_rel_tol: float = 0.005  # published counts are rounded
    bench_preset: str = "tiny"  # bench/'s default run: this Config preset ...
    bench_config: dict = field(default_factory=lambda: dict(BENCH_CPU))  # ... with these overrides
    bench_quick: dict = field(default_factory=lambda: dict(BENCH_QUICK))  # bench/ --quick: overrides on top

    @property
    def model(self):
        return importlib.import_module(f"{self.package}.model")

    @property
    def hf(self):
        return importlib.import_module(f"{self.package}.hf")

    @property
    def train(self):
        return importlib.import_module(f"{self.package}.train")

    @property
    def infra(self):
        return importlib.import_module(f"{self.package}.infra")

    def config(self, **overrides):
        return self.model.Config(**{**self.small, **overrides})

    def build(self, seed=0, **overrides):
        import torch

        torch.manual_seed(seed)
        return self.model.Transformer(self.config(**overrides))


# deepseek3's small model and its transformers twin; kimi_k2 changes only K2's routing and RoPE base
DEEPSEEK3_SMALL = dict(
    vocab_size=97,
    block_size=64,
    n_layer=2,
    n_head=4,
    n_embd=32,
    intermediate_size=80,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=12,
    rope_factor=None,
    n_experts=6,
    n_experts_per_tok=2,
    moe_intermediate_size=24,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    n_mtp=1,
)
DEEPSEEK3_HF = dict(
    vocab_size=101,
    max_position_embeddings=64,
    hidden_size=36,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=6,
    intermediate_size=52,
    moe_intermediate_size=20,
    q_lora_rank=20,
    kv_lora_rank=14,
    qk_nope_head_dim=6,
    qk_rope_head_dim=8,
    v_head_dim=10,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    n_shared_experts=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.7,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    bos_token_id=0,
    eos_token_id=0,
)


MODELS = [
    ModelSpec(
        name="gpt2",
        package="gpt2",
        small=dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32, intermediate_size=80),
        hf_class="GPT2LMHeadModel",
        hf_config=dict(
            vocab_size=101,
            n_positions=48,
            n_embd=36,
            n_layer=3,
            n_head=6,
            n_inner=52,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
        presets={"gpt2": 124_439_808, "gpt2_medium": 354_823_168, "gpt2_large": 774_030_080, "gpt2_xl": 1_557_611_200},
        preset_rel_tol=0.0,
    ),
    ModelSpec(
        name="llama31",
        package="llama31",
        small=dict(
            vocab_size=97,
            block_size=64,
            n_layer=2,
            n_head=4,
            n_kv_heads=2,
            n_embd=32,
            intermediate_size=80,
            rope_original_block_size=16,
        ),
        hf_class="LlamaForCausalLM",
        # head_dim 16 with theta 10,000 and an original context of 32 puts RoPE frequencies in all three
        # Llama 3.1 bands (kept, blended, divided by factor); 48 positions run past the original context
        hf_config=dict(
            vocab_size=101,
            max_position_embeddings=64,
            hidden_size=96,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=52,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            bos_token_id=0,
            eos_token_id=0,
        ),
        parity_seq_len=48,
        bench_quick=dict(BENCH_QUICK, n_kv_heads=2),
        presets={
            "llama31_8b": 8_030_261_248,
            "llama31_70b": 70_553_706_496,
            "llama31_405b": 405_853_388_800,
            "llama32_1b": 1_235_814_400,
            "llama32_3b": 3_212_749_824,
        },
        preset_rel_tol=0.0,
    ),
    ModelSpec(
        name="qwen3",
        package="qwen3",
        small=dict(
            vocab_size=97,
            block_size=64,
            n_layer=2,
            n_head=4,
            n_kv_heads=2,
            n_embd=32,
            head_dim=12,
            intermediate_size=80,
            tie_embeddings=True,
        ),
        hf_class="Qwen3ForCausalLM",
        # head_dim 10 x 6 heads = 60 != hidden_size 36: head_dim is decoupled, as in Qwen3-0.6B; tied like it
        hf_config=dict(
            vocab_size=101,
            max_position_embeddings=64,
            hidden_size=36,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=10,
            intermediate_size=52,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_theta=20000.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
        bench_quick=dict(BENCH_QUICK, n_kv_heads=2),
        presets={
            "qwen3_0_6b": 596_049_920,
            "qwen3_1_7b": 1_720_574_976,
            "qwen3_4b": 4_022_468_096,
            "qwen3_8b": 8_190_735_360,
            "qwen3_14b": 14_768_307_200,
            "qwen3_32b": 32_762_123_264,
        },
        preset_rel_tol=0.0,
    ),
    ModelSpec(
        name="qwen3_moe",
        package="qwen3",
        small=dict(
            vocab_size=97,
            block_size=64,
            n_layer=2,
            n_head=4,
            n_kv_heads=2,
            n_embd=32,
            head_dim=12,
            intermediate_size=80,
            n_experts=6,
            n_experts_per_tok=2,
            moe_intermediate_size=24,
        ),
        hf_class="Qwen3MoeForCausalLM",
        # 7 experts, 3 per token, renormalised; layer 1 keeps a dense MLP (mlp_only_layers). With the
        # parity test's std-0.1 weights every expert is used and no top-3 is near a tie
        hf_config=dict(
            vocab_size=101,
            max_position_embeddings=64,
            hidden_size=36,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=10,
            intermediate_size=52,
            moe_intermediate_size=20,
            num_experts=7,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_theta=1e6,
            bos_token_id=0,
            eos_token_id=0,
        ),
        bench_preset="tiny_moe",  # 8 experts, 2 per token
        bench_quick=dict(BENCH_QUICK, n_kv_heads=2, moe_intermediate_size=32),
        presets={"qwen3_30b_a3b": 30_532_122_624, "qwen3_235b_a22b": 235_093_634_560},
        preset_rel_tol=0.0,
    ),
    ModelSpec(
        name="deepseek3",
        package="deepseek3",
        # layer 0 dense, layer 1 DeepSeekMoE (6 routed experts in 2 groups, 2 per token from 1 group, 1
        # shared), an MTP module, a compressed query; v_head_dim 12 != the query/key head dim 8 + 4
        small=DEEPSEEK3_SMALL,
        hf_class="DeepseekV3ForCausalLM",
        # 3 layers, the first dense; 8 experts in 4 groups, 3 per token from the best 2 groups, 2 shared;
        # rms_norm_eps 1e-5 differs from the latent norms' fixed 1e-6 (a wrong eps there shows), and a
        # routed_scaling_factor != 1; no MTP weights: transformers saves none, whatever its config says
        hf_config=DEEPSEEK3_HF,
        bench_preset="tiny_moe",
        # transformers' DeepseekV3ForCausalLM trains on the cross-entropy alone: no MTP module, no
        # sequence-wise balance loss, so bench/'s twins run without both (the architecture is the same)
        bench_config=dict(BENCH_CPU, n_mtp=0, seq_aux_loss_coef=0.0),
        bench_quick=dict(BENCH_QUICK, moe_intermediate_size=32, n_mtp=0, seq_aux_loss_coef=0.0),
        presets={"deepseek_v3": 671e9, "deepseek_v3_16b": 15.7e9},  # published, rounded: 671B; 15.7B (V2-Lite)
    ),
    ModelSpec(
        name="kimi_k2",
        package="kimi_k2",
        # deepseek3's small model routed as K2 routes: 6 experts in one group (no group limit), 2 per token, 1
        # shared, no MTP module; RoPE unscaled here (tests/test_kimi_k2.py runs K2's YaRN against transformers)
        small=dict(DEEPSEEK3_SMALL, n_group=1, topk_group=1, n_mtp=0),
        # transformers has no kimi_k2 class; K2's checkpoints are DeepSeek-V3's layout, so the oracle is
        # DeepseekV3ForCausalLM on the same weights: 8 experts in a single group, 3 per token, K2's
        # routed_scaling_factor, and a config.json that ours writes as K2's (model_type kimi_k2, 4.x rope)
        hf_class="DeepseekV3ForCausalLM",
        hf_config=dict(
            DEEPSEEK3_HF,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            routed_scaling_factor=2.827,
            rope_theta=50000.0,
            num_nextn_predict_layers=0,
        ),
        bench_preset="tiny_moe",
        # as deepseek3's twins: transformers' DeepseekV3ForCausalLM trains without the balance loss
        bench_config=dict(BENCH_CPU, seq_aux_loss_coef=0.0),
        bench_quick=dict(BENCH_QUICK, moe_intermediate_size=32, seq_aux_loss_coef=0.0),
        # the K2 report's 1.04T total is 1.3% above the published weights' 1,026,408,232,448 (without FP8
        # scales; tests/test_kimi_k2.py asserts that exact count), so the tolerance is 1.5%
        presets={"kimi_k2": 1.04e12},
        preset_rel_tol=0.015,
    ),
]


# RoPE-scaling variants of the models above, in the parity and property families only (tests/test_parity.py,
# tests/test_properties.py): the training, distributed and bench families would add ~45 s per entry to
# the suite, for code (the loop, the wrapping) that does not depend on how RoPE is scaled.
_BASE = {m.name: m for m in MODELS}
VARIANTS = [
    ModelSpec(
        name="llama31_yarn",
        package="llama31",
        # every YaRN knob off its default: betas, an untruncated ramp, an explicit attention factor
        small=dict(
            _BASE["llama31"].small,
            rope_theta=10000.0,
            rope_type="yarn",
            rope_factor=4.0,
            rope_beta_fast=2.0,
            rope_beta_slow=0.1,
            rope_truncate=False,
            rope_attention_factor=1.3,
        ),
        hf_class="LlamaForCausalLM",
        # head_dim 16, theta 10,000 and an original context of 16: frequencies 0, 1-2 and 3-7 fall
        # below beta_fast, on the ramp, and past beta_slow; 48 positions run to 3x the original context
        hf_config=dict(
            _BASE["llama31"].hf_config,
            rope_scaling=dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=16,
                beta_fast=2.0,
                beta_slow=0.1,
                truncate=False,
                attention_factor=1.3,
            ),
        ),
        parity_seq_len=48,
    ),
    ModelSpec(
        name="qwen3_yarn",
        package="qwen3",
        small=dict(_BASE["qwen3"].small, rope_theta=10000.0, rope_factor=4.0, rope_original_block_size=16),
        hf_class="Qwen3ForCausalLM",
        # the spelling of Qwen's model cards (factor and original context only; betas 32 and 1, ramp
        # truncated, attention factor 0.1 ln 4 + 1); an original context of 1,024 puts head_dim 10's
        # frequencies 0, 1-2 and 3-4 below beta_fast, on the ramp and past beta_slow
        hf_config=dict(
            _BASE["qwen3"].hf_config,
            max_position_embeddings=4096,
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024),
        ),
    ),
    ModelSpec(
        name="deepseek3_yarn",
        package="deepseek3",
        # DeepSeek's YaRN: mscale 0.8 != mscale_all_dim 1.0, so a factor reaches both cos/sin and the softmax
        small=dict(
            _BASE["deepseek3"].small,
            qk_rope_head_dim=8,
            rope_factor=4.0,
            rope_original_block_size=16,
            rope_beta_fast=2.0,
            rope_beta_slow=0.05,
            rope_mscale=0.8,
            rope_mscale_all_dim=1.0,
        ),
        hf_class="DeepseekV3ForCausalLM",
        # rope dims 8, theta 10,000 and an original context of 16: frequencies 0, 1 and 2-3 are kept, on
        # the ramp and divided by 4; 24 positions run past the original context. The 4.x spelling
        hf_config=dict(
            _BASE["deepseek3"].hf_config,
            rope_scaling=dict(
                type="yarn",
                factor=4.0,
                original_max_position_embeddings=16,
                beta_fast=2.0,
                beta_slow=0.05,
                mscale=0.8,
                mscale_all_dim=1.0,
            ),
        ),
    ),
    ModelSpec(
        name="deepseek3_q_direct",
        package="deepseek3",
        # one wq projection, no query compression, as the 16B / Lite sizes
        small=dict(_BASE["deepseek3"].small, q_lora_rank=None),
        hf_class="DeepseekV3ForCausalLM",
        hf_config=dict(_BASE["deepseek3"].hf_config, q_lora_rank=None),
    ),
]


def by_name(name):
    return next(m for m in MODELS + VARIANTS if m.name == name)


def randomize_(model, seed=0, std=0.1):
    """Replace the default init (std 0.02, unit norm gains) with weights of std 0.1 and gains 1 +- 0.2,
    for ours or a transformers model. On the default init a model is nearly linear and its logits
    nearly flat: a RoPE position off by one in Llama's cached decoding moves them by ~1e-4, the
    tolerance of the comparison. On these weights the same bug moves them by 1e-2 or more, while
    float32 noise stays ~1e-6."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm_gain = ("norm" in name or "ln" in name) and name.endswith("weight") and p.dim() == 1
            p.copy_(1.0 + 0.2 * noise if is_norm_gain else std * noise)
        # DeepSeek-V3's expert-selection bias is a buffer in transformers (a Parameter in ours): nonzero
        # in both, so the parity tests see it change which experts are chosen
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(std * torch.randn(b.shape, generator=g, dtype=b.dtype))
    return model


def hf_from_pretrained(hf_class, path, **kwargs):
    """transformers' `hf_class`.from_pretrained(path) on a directory ours saved. A config.json whose
    model_type has no transformers class (Kimi K2's "kimi_k2": DeepSeek-V3's layout under Moonshot's
    remote code) is read into hf_class's own config class, model_type left out: transformers picks its
    conversion of per-expert weights by model_type, and under a name it does not know it leaves the
    experts unloaded (randomly initialised, with a warning). The caller has imported transformers."""
    import json
    from pathlib import Path

    cls = getattr(importlib.import_module("transformers"), hf_class)
    saved = json.loads((Path(path) / "config.json").read_text())
    if saved.get("model_type") not in (None, cls.config_class.model_type):
        kwargs["config"] = cls.config_class(**{k: v for k, v in saved.items() if k != "model_type"})
    return cls.from_pretrained(path, **kwargs)
