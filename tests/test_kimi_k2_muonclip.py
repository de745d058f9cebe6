"""kimi_k2/train.py: MuonClip (K2 report sec. 2.1, Algorithm 1). Muon (Nesterov momentum, Newton-Schulz
orthogonalisation, update RMS matched to AdamW's, decoupled weight decay) for the hidden weight matrices, the
experts one matrix at a time, and AdamW for the rest, in one optimizer; QK-Clip rescales the query and key
weights of each head whose largest pre-softmax logit S_max exceeded tau, after the optimizer step. Under
FSDP Muon orthogonalises whole matrices and S_max is the max over the ranks, so 2 ranks train as 1 process;
a resumed run restores both optimizers' state."""

import os
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from registry import by_name
from train_helpers import losses, metrics, run_in_process, run_ranks, train_args

SPEC = by_name("kimi_k2")
ARGS = Namespace(lr=0.02, weight_decay=0.1, beta1=0.9, beta2=0.95)
CPU = torch.device("cpu")


def optimizer_for(model, ns_dtype=None):
    from kimi_k2.train import make_optimizer

    optimizer = make_optimizer(model, ARGS, CPU)
    if ns_dtype is not None:
        optimizer.ns_dtype = ns_dtype
    return optimizer


def groups_by_kind(optimizer):
    """{"muon" | "adamw": [param, ...]}"""
    kinds = {"muon": [], "adamw": []}
    for group in optimizer.param_groups:
        kinds["muon" if group["muon"] else "adamw"] += group["params"]
    return kinds


def random_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def test_muon_holds_the_hidden_matrices_and_adamw_the_rest():
    model = SPEC.build()  # q_lora_rank set: wq_a and wq_b; one dense layer, one MoE layer
    kinds = {kind: {id(p) for p in params} for kind, params in groups_by_kind(optimizer_for(model)).items()}
    names = {id(p): name for name, p in model.named_parameters()}
    muon = sorted(names[i] for i in kinds["muon"])
    adamw = sorted(names[i] for i in kinds["adamw"])
    assert "layers.1.mlp.w1" in muon and "layers.0.mlp.w1.weight" in muon  # experts, dense MLP
    assert "layers.1.mlp.shared_experts.w2.weight" in muon and "layers.0.attn.wkv_b.weight" in muon
    assert all(n.startswith("layers.") and "norm" not in n and "router" not in n for n in muon)
    assert {"tok_emb.weight", "lm_head.weight", "norm.weight", "layers.1.mlp.router.weight"} <= set(adamw)
    assert "layers.1.mlp.router.bias" not in muon + adamw  # no gradient: TrainingExtras moves it
    assert set(muon) | set(adamw) == {n for n, p in model.named_parameters() if p.requires_grad}


def state_bytes(optimizer):
    """Bytes of the optimizer's state tensors, less AdamW's step counts (scalars the memory plan leaves out)."""
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)


def test_memory_plan_counts_muons_one_buffer_and_adamws_two():
    """The memory plan's optimizer term is the real state after a step: one fp32 momentum per Muon matrix,
    two fp32 moments per AdamW parameter, nothing for the routers' biases; counting two for Muon's is wrong."""
    from kimi_k2 import infra

    model = SPEC.build()
    optimizer = optimizer_for(model)
    random_grads([p for p in model.parameters() if p.requires_grad], seed=0)
    optimizer.step()
    args = Namespace(parallel="none", batch_size=1, seq_len=8, activation_checkpointing=False)
    planned = infra.memory_plan(model, args, 1, torch.float32)["optimizer"]
    assert planned == state_bytes(optimizer)
    muon = sum(p.numel() for p in groups_by_kind(optimizer)["muon"])
    assert muon > 0 and planned + 4 * muon != state_bytes(optimizer)  # AdamW's two moments for Muon's matrices


def test_muon_matches_torch_muon_on_matrices():
    """The Muon groups' 2-D matrices, run beside torch.optim.Muon with K2's settings (match_rms_adamw: update
    RMS 0.2 * sqrt(max(A, B)), Nesterov, momentum 0.95, decoupled decay) and NS in bf16 as torch runs it:
    the same weights, bit for bit, after 3 steps."""
    ours = SPEC.build()
    theirs = SPEC.build()
    optimizer = optimizer_for(ours, ns_dtype=torch.bfloat16)
    matrices = [p for p in groups_by_kind(optimizer)["muon"] if p.dim() == 2]
    twins = {id(p): theirs.get_parameter(n) for n, p in ours.named_parameters()}
    reference = torch.optim.Muon(
        [twins[id(p)] for p in matrices], lr=ARGS.lr, weight_decay=ARGS.weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    for step in range(3):
        random_grads(matrices, seed=step)
        random_grads([twins[id(p)] for p in matrices], seed=step)
        optimizer.step()
        reference.step()
    assert len(matrices) > 5
    assert all(torch.equal(p, twins[id(p)]) for p in matrices)
    assert not torch.equal(matrices[0], SPEC.build().get_parameter("layers.0.attn.wq_a.weight"))  # they moved


def test_experts_are_orthogonalised_one_at_a_time():
    """An (experts, out, in) stack's update is each expert's own Muon update, as if it were a 2-D matrix."""
    stack = torch.nn.Parameter(torch.randn(3, 6, 10))
    model = torch.nn.Module()
    model.layers = torch.nn.ParameterList([stack])  # a hidden matrix by name
    apart = [torch.nn.Parameter(stack[e].detach().clone()) for e in range(3)]
    for e, p in enumerate(apart):
        model.register_parameter(f"expert{e}", p)
    optimizer = optimizer_for(model)
    assert len(groups_by_kind(optimizer)["muon"]) == 4
    for step in range(2):
        random_grads([stack], seed=step)
        for e, p in enumerate(apart):
            p.grad = stack.grad[e].clone()
        optimizer.step()
    for e, p in enumerate(apart):
        torch.testing.assert_close(stack[e], p, atol=1e-6, rtol=0)


def test_adamw_part_matches_torch_adamw():
    ours, theirs = SPEC.build(), SPEC.build()
    optimizer = optimizer_for(ours)
    groups = [g for g in optimizer.param_groups if not g["muon"]]
    reference = torch.optim.AdamW(
        [
            {
                "params": [
                    theirs.get_parameter(n) for n, p in ours.named_parameters() if any(p is q for q in g["params"])
                ],
                "weight_decay": g["weight_decay"],
            }
            for g in groups
        ],
        lr=ARGS.lr,
        betas=(ARGS.beta1, ARGS.beta2),
    )
    params = [p for g in groups for p in g["params"]]
    twins = [q for g in reference.param_groups for q in g["params"]]
    for step in range(3):
        random_grads(params, seed=step)
        random_grads(twins, seed=step)
        optimizer.step()
        reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins, strict=True))


# -----------------------------------------------------------------------------
# QK-Clip


def reference_logit_max(model, idx):
    """(n_layer, n_head): each head's largest causal q . k * scale, recomputed from each attention's input."""
    from kimi_k2.model import apply_rope

    found = []

    def record(attn, inputs):
        x, cos, sin = inputs[:3]
        B, T, _ = x.shape
        q = attn.wq(x) if attn.q_direct else attn.wq_b(attn.q_norm(attn.wq_a(x)))
        q_nope, q_rope = q.view(B, T, attn.n_head, -1).transpose(1, 2).split([attn.nope_dim, attn.rope_dim], -1)
        latent, k_rope = attn.wkv_a(x).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
        kv = attn.wkv_b(attn.kv_norm(latent)).view(B, T, attn.n_head, -1).transpose(1, 2)
        k_nope = kv[..., : attn.nope_dim]  # (B, n_head, T, nope)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)  # (B, 1, T, rope)
        logits = q_nope @ k_nope.mT + apply_rope(q_rope, cos, sin) @ k_rope.mT  # (B, n_head, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        found.append((logits * attn.scale).masked_fill(~causal, -torch.inf).amax(dim=(0, 2, 3)))

    handles = [block.attn.register_forward_pre_hook(record) for block in model.layers]
    with torch.no_grad():
        model(idx)
    for handle in handles:
        handle.remove()
    return torch.stack(found)


def with_config(model, **overrides):
    """A copy of model, the same weights, whose Config differs by overrides."""
    twin = type(model)(replace(model.cfg, **overrides))
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def forward_logit_max(model, idx):
    aux = {}
    with torch.no_grad():
        model(idx, idx, aux=aux)
    return aux["attn_logit_max"]


@pytest.mark.parametrize("q_lora_rank", [24, None], ids=["wq_b", "wq"])
def test_qk_clip_caps_the_clipped_heads_and_leaves_the_others(q_lora_rank):
    """The forward reports S_max per layer and head; with Config.qk_clip_tau between the heads' S_max,
    after_step scales the heads above it so that the next forward's S_max is tau (one layer: its input is
    unchanged), and leaves the other heads' weights, the values' rows and the shared rope key bit for bit."""
    from kimi_k2.train import TrainingExtras

    model = SPEC.build(n_layer=1, q_lora_rank=q_lora_rank).train()
    with torch.no_grad():  # larger queries and keys than init's, so the logits spread over the heads
        for p in model.parameters():
            p.mul_(8)
    idx = torch.randint(0, SPEC.small["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    before = forward_logit_max(model, idx)
    torch.testing.assert_close(before, reference_logit_max(model, idx))
    tau = before.median().item()  # far under K2's 100: QK-Clip must take tau from the Config
    model = with_config(model, qk_clip_tau=tau)
    clipped = before[0] > tau
    assert 0 < clipped.sum() < model.cfg.n_head
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    extras = TrainingExtras(model, None, CPU)
    extras.after_forward({"attn_logit_max": before})
    extras.after_step(model)
    after = forward_logit_max(model, idx)
    torch.testing.assert_close(after[0, clipped], torch.full_like(after[0, clipped], tau), rtol=1e-5, atol=0)
    assert torch.equal(after[0, ~clipped], before[0, ~clipped])

    attn = model.layers[0].attn
    query = "wq.weight" if q_lora_rank is None else "wq_b.weight"
    q_rows = weights[f"layers.0.attn.{query}"].view(attn.n_head, attn.nope_dim + attn.rope_dim, -1)
    kv_rows = weights["layers.0.attn.wkv_b.weight"].view(attn.n_head, attn.nope_dim + attn.v_dim, -1)
    gamma = tau / before[0, clipped]
    new_q = model.get_parameter(f"layers.0.attn.{query}").view_as(q_rows)
    new_kv = model.get_parameter("layers.0.attn.wkv_b.weight").view_as(kv_rows)
    assert torch.equal(new_q[~clipped], q_rows[~clipped]) and torch.equal(new_kv[~clipped], kv_rows[~clipped])
    nope, rope = q_rows[clipped].split([attn.nope_dim, attn.rope_dim], dim=1)
    torch.testing.assert_close(new_q[clipped][:, : attn.nope_dim], nope * gamma.sqrt()[:, None, None])
    torch.testing.assert_close(new_q[clipped][:, attn.nope_dim :], rope * gamma[:, None, None])
    torch.testing.assert_close(
        new_kv[clipped][:, : attn.nope_dim], kv_rows[clipped][:, : attn.nope_dim] * gamma.sqrt()[:, None, None]
    )
    assert torch.equal(new_kv[:, attn.nope_dim :], kv_rows[:, attn.nope_dim :])  # the values
    untouched = [n for n in weights if not n.endswith((query, "wkv_b.weight"))]
    assert all(torch.equal(weights[n], model.get_parameter(n)) for n in untouched)  # wkv_a: the rope key


def test_qk_clip_takes_the_max_over_micro_batches_and_skips_heads_under_tau():
    from kimi_k2.train import TrainingExtras

    model = SPEC.build()
    extras = TrainingExtras(model, None, CPU)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    low = torch.full((model.cfg.n_layer, model.cfg.n_head), 50.0)
    extras.after_forward({"attn_logit_max": low * 1.5})
    extras.after_forward({"attn_logit_max": low})
    extras.after_step(model)  # 75 < tau = 100: nothing to clip
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters() if "router" not in n)
    assert extras.summary()["max_attention_logit"] == 75.0
    high = low.clone()
    high[1, 2] = 400.0  # gamma 1/4 for layer 1's head 2
    extras.after_forward({"attn_logit_max": high})
    extras.after_step(model)
    changed = [n for n, p in model.named_parameters() if not torch.equal(weights[n], p)]
    assert sorted(changed) == ["layers.1.attn.wkv_b.weight", "layers.1.attn.wq_b.weight"], changed


def test_qk_clip_tau_is_a_config_field_set_from_the_command_line():
    from kimi_k2.infra import parse_overrides
    from kimi_k2.train import TrainingExtras

    assert parse_overrides(["qk_clip_tau=30"]) == {"qk_clip_tau": 30.0}
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"Config.qk_clip_tau must be > 0, got"):
            TrainingExtras(SPEC.build(qk_clip_tau=bad), None, CPU)


# -----------------------------------------------------------------------------
# Distributed and resumed runs

STEPS = 4
# below the small model's logits (about 0.01 to 0.1 at init) so that QK-Clip acts at every step
LOW_TAU = 0.02
SET_LOW_TAU = f"--set=qk_clip_tau={LOW_TAU}"


@pytest.fixture
def record_clipping(monkeypatch):
    """Each rank saves, after every step, the step's S_max (reduced over the ranks) and the whole query
    projection it then holds into <out_dir>/clip_rank<R>.pt; the runs set QK-Clip's tau to LOW_TAU."""
    import kimi_k2.train as train

    class Recording(train.TrainingExtras):
        def __init__(self, model, args, device):
            super().__init__(model, args, device)
            assert self.tau == LOW_TAU, "--set qk_clip_tau did not reach QK-Clip"
            self.path = Path(args.out_dir) / f"clip_rank{os.environ.get('RANK', 0)}.pt"
            self.history = []

        def after_step(self, model):
            logit_max = self.step_logit_max.clone()  # this rank's, before the MAX over the ranks
            super().after_step(model)
            w = model.layers[1].attn.wq_b.weight
            w = w.full_tensor() if hasattr(w, "full_tensor") else w
            self.history.append((logit_max, w.detach().clone()))
            torch.save(self.history, self.path)

    monkeypatch.setattr(train, "TrainingExtras", Recording)


def recorded(out_dir, rank=0):
    return torch.load(Path(out_dir) / f"clip_rank{rank}.pt")


def test_fsdp_two_ranks_train_as_one_process(record_clipping, toy_data, tmp_path):
    """2 gloo ranks with one micro-batch each = one process with both: Muon orthogonalises whole matrices
    (gathered) and each rank keeps its rows; S_max is the max over the ranks, so both ranks clip alike and
    hold the single process's weights."""
    args = train_args(SPEC, toy_data, tmp_path / "single", "--max-steps", STEPS, SET_LOW_TAU)
    single = run_in_process(SPEC, *args, "--total-batch-tokens", 2 * 4 * 16)
    fsdp = train_args(SPEC, toy_data, tmp_path / "fsdp", "--max-steps", STEPS, SET_LOW_TAU)
    run_ranks(SPEC, *fsdp, "--parallel", "fsdp")
    expected = recorded(tmp_path / "single")
    ranks = [recorded(tmp_path / "fsdp", rank) for rank in range(2)]
    assert all((s > LOW_TAU).any() for s, _ in expected)  # clipping at every step
    for step in range(STEPS):
        per_rank = torch.stack([ranks[r][step][0] for r in range(2)])
        assert not torch.equal(per_rank[0], per_rank[1])  # the ranks saw different tokens ...
        torch.testing.assert_close(per_rank.amax(0), expected[step][0], atol=1e-5, rtol=0)  # ... the max is one's
        assert torch.equal(ranks[0][step][1], ranks[1][step][1])
        torch.testing.assert_close(ranks[0][step][1], expected[step][1], atol=1e-5, rtol=0)
    assert losses(metrics(tmp_path / "fsdp")) == pytest.approx(losses(single), abs=1e-5)


def test_resume_restores_both_optimizers(record_clipping, toy_data, tmp_path):
    """--stop-after then --resume continues bit for bit: Muon's momentum and AdamW's moments and step come
    back from the checkpoint (a fresh Muon momentum or AdamW step would change the later losses)."""
    whole = run_in_process(SPEC, *train_args(SPEC, toy_data, tmp_path / "whole", "--max-steps", 6, SET_LOW_TAU))
    args = train_args(SPEC, toy_data, tmp_path / "split", "--max-steps", 6, SET_LOW_TAU)
    first = run_in_process(SPEC, *args, "--stop-after", 3)
    state = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["optim"]["state"]
    assert "layers.0.attn.wq_a.weight" in state and "tok_emb.weight" in state
    assert set(state["layers.0.attn.wq_a.weight"]) == {"momentum_buffer"}
    assert set(state["tok_emb.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    second = run_in_process(SPEC, *args, "--resume")
    assert losses(first) + losses(second) == losses(whole)
    assert torch.equal(recorded(tmp_path / "split")[-1][1], recorded(tmp_path / "whole")[-1][1])
