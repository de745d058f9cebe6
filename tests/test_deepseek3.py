"""DeepSeek-V3's own parts, beyond the families every model runs: MLA's weight-absorbed form equals
the naive one, the router equals transformers' DeepseekV3TopkRouter (the selection bias included),
the latent norms keep eps 1e-6, the MTP and balance losses, the published sizes, and config.json."""

import math
from dataclasses import asdict

import pytest
import torch

from registry import by_name, import_transformers, randomize_

SPEC = by_name("deepseek3")
model_py = SPEC.model
hf_py = SPEC.hf


def hf_config():
    return import_transformers().DeepseekV3Config(**SPEC.hf_config)


@pytest.mark.parametrize("variant", ["deepseek3", "deepseek3_q_direct", "deepseek3_yarn"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_absorbed_attention_equals_naive(variant, attn_impl):
    """On random latents, with T queries after a prefix (pos > 0) and over the whole sequence."""
    torch.manual_seed(0)
    cfg = by_name(variant).config(attn_impl=attn_impl)
    attn = randomize_(model_py.Attention(cfg))
    B, S, H = 2, 11, cfg.n_head
    q_nope = torch.randn(B, H, S, cfg.qk_nope_head_dim)
    q_rope = torch.randn(B, H, S, cfg.qk_rope_head_dim)
    latent, k_rope = torch.randn(B, S, cfg.kv_lora_rank), torch.randn(B, S, cfg.qk_rope_head_dim)
    kv = torch.cat([latent, k_rope], dim=-1)
    for T in (S, 3, 1):
        pos = S - T
        naive = attn.naive(q_nope[:, :, pos:], q_rope[:, :, pos:], latent, k_rope, pos)
        absorbed = attn.absorbed(q_nope[:, :, pos:], q_rope[:, :, pos:], kv, pos)
        assert naive.shape == absorbed.shape == (B, H, T, cfg.v_head_dim)
        torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-5)


def test_router_matches_transformers_with_a_selection_bias():
    transformers_v3 = import_transformers("transformers.models.deepseek_v3.modeling_deepseek_v3")
    config = hf_config()
    theirs = transformers_v3.DeepseekV3TopkRouter(config)
    ours = model_py.Router(hf_py.config_from_hf(config.to_dict()))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(0.3 * torch.randn(theirs.weight.shape, generator=g))
        theirs.e_score_correction_bias.copy_(0.2 * torch.randn(theirs.e_score_correction_bias.shape, generator=g))
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.e_score_correction_bias)
    x = torch.randn(256, config.hidden_size, generator=g)
    logits, their_weights, their_experts = theirs(x)
    weights, experts, scores = ours(x)
    torch.testing.assert_close(scores, logits.sigmoid())
    # the same experts with the same weights, in whatever order topk returned them
    their_order, order = their_experts.argsort(dim=-1), experts.argsort(dim=-1)
    assert torch.equal(experts.gather(1, order), their_experts.gather(1, their_order))
    torch.testing.assert_close(weights.gather(1, order), their_weights.gather(1, their_order))
    # the bias changes which experts win, and only that: the weights stay unbiased affinities
    with torch.no_grad():
        ours.bias.zero_()
    unbiased_weights, unbiased_experts, _ = ours(x)
    changed = (unbiased_experts.sort(dim=-1).values != experts.sort(dim=-1).values).any(dim=-1)
    assert changed.float().mean() > 0.2
    same = ~changed
    torch.testing.assert_close(
        unbiased_weights[same].gather(1, unbiased_experts[same].argsort(dim=-1)),
        weights[same].gather(1, experts[same].argsort(dim=-1)),
    )


def test_router_keeps_to_the_best_groups():
    """Group-limited routing: every chosen expert lies in one of the topk_group best groups."""
    cfg = SPEC.config()
    router = randomize_(model_py.Router(cfg))
    _, experts, scores = router(torch.randn(64, cfg.n_embd))
    per_group = cfg.n_experts // cfg.n_group
    groups = (scores + router.bias).view(64, cfg.n_group, per_group).topk(2, dim=-1).values.sum(-1)
    best = groups.topk(cfg.topk_group, dim=-1).indices  # (64, topk_group)
    assert ((experts // per_group).unsqueeze(-1) == best.unsqueeze(1)).any(-1).all()


def test_latent_norms_use_eps_1e_6_whatever_rms_norm_eps(tmp_path):
    """The parity model's rms_norm_eps is 1e-5; with the layer norms' gains at 3e-3 the latents are
    small enough (mean square ~ 1e-6) that the eps of q_norm and kv_norm moves the logits."""
    transformers = import_transformers()
    theirs = randomize_(transformers.DeepseekV3ForCausalLM(hf_config()).eval())
    with torch.no_grad():
        for layer in theirs.model.layers:
            layer.input_layernorm.weight.mul_(3e-3)
    theirs.save_pretrained(tmp_path)
    ours = model_py.Transformer.from_pretrained(tmp_path).eval()
    assert ours.layers[0].attn.kv_norm.eps == ours.layers[0].attn.q_norm.eps == 1e-6 != ours.cfg.norm_eps
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, rtol=0, atol=1e-4)


def test_training_loss_adds_mtp_and_balance_terms():
    model = SPEC.build(seq_aux_loss_coef=0.01)
    randomize_(model)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(idx, -1, dims=1)
    model.train()
    aux = {}
    _, loss = model(idx, targets, aux=aux)
    model.eval()
    _, ce = model(idx, targets)
    expected = ce + model.cfg.mtp_loss_weight * aux["mtp_loss"] + 0.01 * aux["load_balancing_loss"]
    torch.testing.assert_close(loss, expected)
    assert aux["mtp_loss"] > 0
    # the MTP term is the main model's hidden state and the next token through the MTP block and head
    model.train()
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    h = model.tok_emb(idx)
    for layer in model.layers:
        h = layer(h, cos, sin)[0]
    mtp_h = model.mtp[0](model.norm(h)[:, :-1], model.tok_emb(idx[:, 1:]), cos[:9], sin[:9])[0]
    expected_mtp = torch.nn.functional.cross_entropy(model.lm_head(mtp_h).flatten(0, 1), targets[:, 1:].flatten())
    torch.testing.assert_close(aux["mtp_loss"], expected_mtp)


def test_mtp_blocks_moe_layer_is_in_the_balance_loss_and_the_expert_load():
    """Every MoE layer is balanced (report sec. 2.1.2), the MTP block's included: a training forward reports
    one expert_load row per MoE layer that ran, the main layers' first, then the MTP block's (over the T-1
    positions it sees), and the balance loss sums eq. 17 over all of them. Eval forwards skip the MTP block."""
    model = randomize_(SPEC.build()).train()
    moes = [block.mlp for block in [*model.layers, model.mtp[0].block] if hasattr(block.mlp, "router")]
    assert len(moes) == 2  # layer 1 and the MTP block (layer index n_layer)
    routing = []
    for moe in moes:
        moe.register_forward_hook(lambda module, inputs, out: routing.append((module, out[1], out[2])))
    B, T = 2, 10
    idx = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    aux = {}
    model(idx, torch.roll(idx, -1, dims=1), aux=aux)
    assert [module for module, _, _ in routing] == moes  # run in row order
    E, k = model.cfg.n_experts, model.cfg.n_experts_per_tok
    expected_load = torch.stack([model_py.expert_load(experts, E) for _, _, experts in routing])
    assert torch.equal(aux["expert_load"], expected_load)
    assert aux["expert_load"].sum(-1).tolist() == [B * T * k, B * (T - 1) * k]
    expected_balance = sum(model_py.sequence_balance_loss(s, e, B) for _, s, e in routing)
    torch.testing.assert_close(aux["load_balancing_loss"], expected_balance)
    model.eval()
    aux = {}
    model(idx, torch.roll(idx, -1, dims=1), aux=aux)
    assert aux["expert_load"].shape == (1, E)  # the main layer only


def test_sequence_balance_loss_is_one_when_routing_is_even():
    E, T = 4, 6
    scores = torch.full((2 * T, E), 0.5)  # equal affinities: P_i = 1/E
    experts = torch.tensor([[0, 1], [2, 3]] * T)  # k = 2: each expert picked T/2 times in each sequence
    assert model_py.sequence_balance_loss(scores, experts, batch_size=2).item() == pytest.approx(1.0)
    lopsided = torch.tensor([[0, 1]] * (2 * T))
    skewed = scores.clone()
    skewed[:, :2] = 0.9  # the chosen experts also hold most of the affinity
    # f = (2, 2, 0, 0), P = (0.9, 0.9, 0.5, 0.5) / 2.8: sum f_i P_i = 4 * 0.9 / 2.8
    assert model_py.sequence_balance_loss(skewed, lopsided, batch_size=2).item() == pytest.approx(4 * 0.9 / 2.8)


def test_published_sizes_on_the_meta_device():
    with torch.device("meta"):
        model = model_py.Transformer(model_py.Config.deepseek_v3())
    assert round(model.num_params() / 1e9) == 671
    assert 37e9 <= model.num_params(active=True) < 38e9  # "37B activated for each token"
    # the model card's "685B = 671B main model + 14B MTP module": the MTP layer of the checkpoint
    # repeats the embedding and the head (13.5B in all)
    mtp = sum(p.numel() for p in model.mtp.parameters()) + 2 * model.tok_emb.weight.numel()
    assert 13e9 < mtp < 14.5e9


HUB_V3_CONFIG = dict(  # deepseek-ai/DeepSeek-V3's config.json (transformers 4.x spelling), architecture fields
    vocab_size=129280, max_position_embeddings=163840, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
    num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=10000, attention_bias=False, model_type="deepseek_v3",
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                      original_max_position_embeddings=4096, type="yarn"),
)  # fmt: skip


def test_hub_config_is_the_deepseek_v3_preset_and_round_trips():
    cfg = hf_py.config_from_hf(HUB_V3_CONFIG)
    assert asdict(cfg) == asdict(model_py.Config.deepseek_v3())
    assert hf_py.config_from_hf(hf_py.config_to_hf(cfg)) == cfg
    # the softmax-attention scale of YaRN at factor 40: (0.1 ln 40 + 1)^2 / sqrt(192)
    assert model_py.softmax_scale(cfg) == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(192))


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(rope_interleave=False), "rope_interleave"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(topk_method="greedy"), "topk_method"),
        (dict(scoring_func="sqrtsoftplus"), "scoring_func"),
    ],
)
def test_config_json_refuses_what_is_not_implemented(change, named):
    with pytest.raises(ValueError, match=named):
        hf_py.config_from_hf({**HUB_V3_CONFIG, **change})


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(n_experts=6, n_group=4), "n_group"),
        (dict(topk_group=3), "topk_group"),
        (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(n_mtp=2), "n_mtp"),
        (dict(scoring_func="relu"), "scoring_func"),
    ],
)
def test_bad_config_names_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        SPEC.config(**fields)
