"""Qwen 3's mixture-of-experts layer: the grouped fast path equals the readable loop, the router
keeps its promises, the load-balancing loss is Hugging Face's, the block matches transformers'
Qwen3MoeSparseMoeBlock weight for weight, and forward's `aux` reports the routing statistics."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3.hf import config_from_hf
from qwen3.model import Config, MoE, Router, expert_load, grouped_mm, load_balancing_loss, padded_bmm
from registry import by_name, import_transformers


def moe_config(n_embd=24, n_experts=6, top_k=2, hidden=10, **overrides):
    return Config.from_preset(
        "tiny_moe",
        n_embd=n_embd,
        n_experts=n_experts,
        n_experts_per_tok=top_k,
        moe_intermediate_size=hidden,
        **overrides,
    )


def random_moe(cfg, seed=0, std=0.3):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, std)
    return moe


def run(moe, x, impl):
    moe.impl = impl
    return moe(x)


@settings(max_examples=20, deadline=None)
@given(
    n_tokens=st.integers(1, 40),
    n_experts=st.integers(1, 12),
    data=st.data(),
    norm_topk_prob=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_equals_loop(n_tokens, n_experts, data, norm_topk_prob, seed):
    top_k = data.draw(st.integers(1, n_experts), label="top_k")
    moe = random_moe(moe_config(n_experts=n_experts, top_k=top_k, norm_topk_prob=norm_topk_prob), seed)
    x = torch.randn(1, n_tokens, moe.w1.size(2), generator=torch.Generator().manual_seed(seed))
    y_loop, logits_loop, experts_loop = run(moe, x, "loop")
    y_grouped, logits_grouped, experts_grouped = run(moe, x, "grouped")
    assert torch.equal(logits_loop, logits_grouped) and torch.equal(experts_loop, experts_grouped)
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-5)


def test_grouped_equals_loop_gradients():
    moe = random_moe(moe_config(n_experts=8, top_k=3))
    x = torch.randn(2, 9, 24)
    grads = {}
    for impl in ("loop", "grouped"):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y, logits, experts = run(moe, xi, impl)
        ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + load_balancing_loss([logits], [experts])).backward()
        grads[impl] = [xi.grad] + [p.grad for p in moe.parameters()]
    for g_loop, g_grouped in zip(grads["loop"], grads["grouped"]):
        torch.testing.assert_close(g_grouped, g_loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_idle_experts_get_a_zero_gradient(impl):
    # DDP needs a gradient for every parameter on every step, even for experts no token chose
    moe = random_moe(moe_config(n_experts=16, top_k=1))
    y, *_ = run(moe, torch.randn(1, 3, 24), impl)
    y.sum().backward()
    assert all(p.grad is not None for p in moe.parameters())
    idle = [e for e in range(16) if moe.w1.grad[e].abs().sum() == 0]
    assert len(idle) >= 13  # 3 tokens reach at most 3 experts


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=9), seed=st.integers(0, 2**16))
def test_grouped_mm_and_padded_fallback_equal_per_group_matmuls(counts, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), 5, generator=g)
    w = torch.randn(len(counts), 3, 5, generator=g)  # (groups, out, in)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    starts = [0] + offs[:-1].tolist()
    expected = torch.cat([x[s:e] @ w[i].T for i, (s, e) in enumerate(zip(starts, offs.tolist()))])
    torch.testing.assert_close(grouped_mm(x, w, offs), expected)
    torch.testing.assert_close(padded_bmm(x, w, offs), expected)


@settings(max_examples=20, deadline=None)
@given(n_experts=st.integers(1, 16), data=st.data(), seed=st.integers(0, 2**16))
def test_router_picks_k_distinct_experts_with_weights_summing_to_one(n_experts, data, seed):
    top_k = data.draw(st.integers(1, n_experts), label="top_k")
    torch.manual_seed(seed)
    router = Router(moe_config(n_experts=n_experts, top_k=top_k, norm_topk_prob=True))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(13, 24)
    weights, experts, logits = router(x)
    assert weights.shape == experts.shape == (13, top_k) and logits.shape == (13, n_experts)
    assert all(len(set(row)) == top_k for row in experts.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(13))
    # the chosen experts are the k most probable ones, and the weights are their renormalised probabilities
    probs = F.softmax(logits, dim=-1)
    assert torch.all(probs.gather(1, experts).min(-1).values >= probs.topk(top_k).values[:, -1] - 1e-7)
    chosen = probs.gather(1, experts)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


def test_router_without_renormalisation_returns_raw_probabilities():
    torch.manual_seed(0)
    router = Router(moe_config(n_experts=8, top_k=2, norm_topk_prob=False))
    torch.nn.init.normal_(router.weight)
    weights, experts, logits = router(torch.randn(7, 24))
    torch.testing.assert_close(weights, F.softmax(logits, dim=-1).gather(1, experts))
    assert torch.all(weights.sum(-1) < 1)


def test_load_balancing_loss_matches_an_explicit_formula_and_hugging_face():
    g = torch.Generator().manual_seed(0)
    E, k = 6, 2
    layers = [torch.randn(11, E, generator=g) for _ in range(3)]
    picks = [F.softmax(logits, dim=-1).topk(k, dim=-1).indices for logits in layers]  # what the Router chooses
    # independent formula: Switch Transformer eq. 4 with the top-k fraction f_i, pooled over layers
    rows = torch.cat(layers)
    probs = rows.softmax(-1)
    top = probs.topk(k, dim=-1).indices
    f = torch.tensor([(top == i).any(-1).float().mean().item() for i in range(E)])
    P = probs.mean(0)
    expected = E * sum(f[i] * P[i] for i in range(E))
    got = load_balancing_loss(layers, picks)
    torch.testing.assert_close(got, expected)
    hf = import_transformers("transformers.models.qwen3_moe.modeling_qwen3_moe")
    torch.testing.assert_close(got, hf.load_balancing_loss_func(tuple(layers), E, k))
    # perfectly even routing scores k (f sums to k, P = 1/E), whichever k distinct experts are picked
    even_picks = torch.arange(4 * k).view(4, k) % E
    torch.testing.assert_close(load_balancing_loss([torch.zeros(4, E)], [even_picks]), torch.tensor(float(k)))


def test_load_balancing_loss_gradient_flows_through_the_probabilities_only():
    logits = torch.randn(10, 5, requires_grad=True)
    load_balancing_loss([logits], [logits.detach().topk(2, dim=-1).indices]).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_routing_statistics_compile_without_graph_breaks():
    # static output shapes (scatter_add_, not bincount), so a compiled training step stays one graph
    logits, experts = torch.randn(9, 5), torch.randint(0, 5, (9, 2))
    compiled_load = torch.compile(expert_load, fullgraph=True, backend="eager")
    assert torch.equal(compiled_load(experts, 5), torch.bincount(experts.flatten(), minlength=5).float())
    compiled_loss = torch.compile(load_balancing_loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled_loss([logits], [experts]), load_balancing_loss([logits], [experts]))


def hf_block(cfg, moe, experts_implementation):
    transformers = import_transformers()
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = transformers.Qwen3MoeConfig(
        hidden_size=cfg.n_embd,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_experts=cfg.n_experts,
        num_experts_per_tok=cfg.n_experts_per_tok,
        norm_topk_prob=cfg.norm_topk_prob,
        experts_implementation=experts_implementation,
    )
    block = Qwen3MoeSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], dim=1))  # (E, 2 * hidden, n_embd)
        block.experts.down_proj.copy_(moe.w2)
    return block


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
def test_moe_matches_hugging_face_block(impl, norm_topk_prob, experts_implementation):
    cfg = moe_config(n_embd=20, n_experts=7, top_k=3, hidden=12, norm_topk_prob=norm_topk_prob)
    moe = random_moe(cfg)
    theirs = hf_block(cfg, moe, experts_implementation)
    x = torch.randn(3, 5, 20)
    with torch.no_grad():
        y, *_ = run(moe, x, impl)
        expected = theirs(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# --- the whole model -----------------------------------------------------------------------------

# from each model card: total, activated (MoE) and non-embedding parameters, in billions; the
# cards' "non-embedding" leaves out both the token embedding and an untied lm_head
PUBLISHED = {
    "qwen3_0_6b": ("0.6", None, "0.44"),
    "qwen3_1_7b": ("1.7", None, "1.4"),
    "qwen3_4b": ("4.0", None, "3.6"),
    "qwen3_8b": ("8.2", None, "6.95"),
    "qwen3_14b": ("14.8", None, "13.2"),
    "qwen3_32b": ("32.8", None, "31.2"),
    "qwen3_30b_a3b": ("30.5", "3.3", "29.9"),
    "qwen3_235b_a22b": ("235", "22", "234"),
}


def agrees_with_published(n, published):
    # within one unit of the last published digit: the cards round, and 30B-A3B's 3.353B active reads "3.3B"
    unit = 10.0 ** -len(published.partition(".")[2])
    return abs(n / 1e9 - float(published)) <= unit * (1 + 1e-9)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_counts_match_the_model_cards(preset):
    from qwen3.model import Transformer

    total, active, non_embedding = PUBLISHED[preset]
    with torch.device("meta"):  # shapes only: no memory, no time
        model = Transformer(Config.from_preset(preset))
    n_lm_head = 0 if model.cfg.tie_embeddings else model.lm_head.weight.numel()
    assert agrees_with_published(model.num_params(), total)
    assert agrees_with_published(model.num_params(non_embedding=True) - n_lm_head, non_embedding)
    if active is None:
        assert model.num_params(active=True) == model.num_params()
    else:
        assert agrees_with_published(model.num_params(active=True), active)


def test_published_config_json_maps_to_the_presets():
    # abridged config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-30B-A3B (transformers 4.51 spelling)
    common = dict(
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=None,
        head_dim=128,
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
    )
    dense = dict(
        common,
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    moe = dict(
        common,
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=0.001,
    )
    assert config_from_hf(dense) == Config.qwen3_0_6b()
    assert config_from_hf(moe) == Config.qwen3_30b_a3b()
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf(dict(dense, use_sliding_window=True))


@pytest.mark.parametrize(
    "rope",
    [
        # YaRN is read (tests/test_yarn.py); any other scaling is refused
        dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),  # 4.x
        dict(rope_scaling={"type": "dynamic", "factor": 4.0}),  # the oldest spelling
        dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0}),  # transformers >= 5
    ],
)
def test_config_json_asking_for_rope_scaling_is_rejected(rope):
    dense = dict(
        model_type="qwen3",
        vocab_size=151936,
        max_position_embeddings=40960,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
    )
    assert config_from_hf(dense).rope_theta == 10000.0  # no rope_* keys at all: transformers' default base
    with pytest.raises(ValueError, match="RoPE scaling of type '(linear|dynamic|llama3)'.*only 'default'"):
        config_from_hf(dict(dense, **rope))


def record_routing(model):
    """The test's own view of every Router call: (logits, chosen experts), in layer order."""
    calls = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda m, i, o: calls.append((o[2].detach(), o[1])))
    return calls


def test_training_loss_adds_the_balancing_loss_and_eval_loss_does_not():
    model = by_name("qwen3_moe").build(router_aux_loss_coef=0.5)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 7))
    logits, _ = model(idx)  # with targets a forward returns no logits: they come from one without
    routing = record_routing(model)
    _, loss = model.train()(idx, idx)
    ce = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    expected = load_balancing_loss([r for r, _ in routing], [e for _, e in routing])
    torch.testing.assert_close(loss, ce + 0.5 * expected)
    _, loss = model.eval()(idx, idx)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), idx.flatten()))


def test_aux_reports_this_forwards_expert_load_and_balancing_loss():
    # 3 layers, the middle one dense: expert_load has one row per MoE layer only
    model = by_name("qwen3_moe").build(n_layer=3, mlp_only_layers=(1,), router_aux_loss_coef=0.25)
    E, k, (B, T) = model.cfg.n_experts, model.cfg.n_experts_per_tok, (3, 7)
    idx = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    logits, _ = model(idx)  # with targets a forward returns no logits: they come from one without
    routing = record_routing(model)
    aux = {}
    _, loss = model.train()(idx, idx, aux=aux)
    assert sorted(aux) == ["expert_load", "load_balancing_loss"] and len(routing) == 2
    load, balance = aux["expert_load"], aux["load_balancing_loss"]
    assert load.dtype == balance.dtype == torch.float32 and not (load.requires_grad or balance.requires_grad)
    assert load.shape == (2, E) and balance.shape == ()
    assert load.sum(-1).tolist() == [B * T * k] * 2  # every (token, pick) pair counted once per layer
    assert torch.equal(load, torch.stack([torch.bincount(e.flatten(), minlength=E) for _, e in routing]).float())
    torch.testing.assert_close(balance, load_balancing_loss([r for r, _ in routing], [e for _, e in routing]))
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), idx.flatten()) + 0.25 * balance)
    # eval mode: the same statistics are reported, and not added to the loss
    aux_eval = {}
    _, loss = model.eval()(idx, idx, aux=aux_eval)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), idx.flatten()))
    assert torch.equal(aux_eval["expert_load"], load)
    torch.testing.assert_close(aux_eval["load_balancing_loss"], balance)


@pytest.mark.parametrize("name", ["gpt2", "llama31", "qwen3"])
def test_aux_stays_empty_for_dense_models(name):
    model = by_name(name).build()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 5))
    aux = {}
    model.train()(idx, idx, aux=aux)
    assert aux == {}


def test_loading_accepts_the_fused_expert_tensors_of_transformers_in_memory():
    import_transformers()
    from qwen3.hf import hf_to_ours, load_state_dict_strict
    from qwen3.model import Transformer
    from test_parity import hf_model, random_ids

    spec = by_name("qwen3_moe")
    theirs = hf_model(spec)
    assert any(k.endswith("experts.gate_up_proj") for k in theirs.state_dict())  # transformers >= 5
    ours = Transformer(config_from_hf(theirs.config.to_dict())).eval()
    load_state_dict_strict(ours, hf_to_ours(theirs.state_dict(), ours.cfg))
    idx = random_ids(ours.cfg.vocab_size, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, rtol=0, atol=1e-4)


def test_parity_config_routes_to_every_expert_without_near_ties():
    """The parity test's random weights must exercise the routing, not a degenerate corner of it."""
    import_transformers()
    from test_parity import hf_model, random_ids

    spec = by_name("qwen3_moe")
    theirs = hf_model(spec)
    with torch.no_grad():
        out = theirs(random_ids(spec.hf_config["vocab_size"], spec.parity_seq_len), output_router_logits=True)
    k = spec.hf_config["num_experts_per_tok"]
    assert len(out.router_logits) >= 2  # one per MoE layer
    for logits in out.router_logits:
        probs = logits.softmax(-1).sort(dim=-1, descending=True).values
        picked = logits.topk(k, dim=-1).indices
        assert torch.bincount(picked.flatten(), minlength=logits.size(-1)).min() > 0
        assert (probs[:, k - 1] - probs[:, k]).min() > 1e-5  # far above fp32 noise: the same top-k in both
