"""Llama 3 in Meta's own format (params.json + consolidated.NN.pth), against Meta's reference model:
llama-models' `llama_models.llama3.model.Transformer`, run on CPU through fairscale's model-parallel
layers at size 1. The same random weights give the same logits in our model, in both directions,
and from model-parallel shards cut by llama-models' own resharding code."""

import json

import pytest
import torch
import torch.distributed as dist

from llama31 import hf
from llama31.model import Transformer
from registry import import_transformers, randomize_

meta_model = import_transformers("llama_models.llama3.model")  # skipped without llama-models, except in CI
fs_init = import_transformers("fairscale.nn.model_parallel.initialize")
from llama_models.checkpoint import reshard_mp  # noqa: E402 (after the skip)
from llama_models.llama3.args import ModelArgs  # noqa: E402

# head_dim 16 with theta 500,000 puts RoPE frequencies in all three bands of Meta's scaling (fixed
# at an original context of 8192): wavelengths 6 .. 862 kept, 4,450 blended, 22,960 and up divided by
# 8; 96 positions turn the slowest kept frequency past a radian, so a wrong band moves the logits
PARAMS = dict(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=32, ffn_dim_multiplier=1.3,
    norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
)  # fmt: skip
SEQ_LEN = 96


@pytest.fixture(scope="module", autouse=True)
def model_parallel_of_one(tmp_path_factory):
    """fairscale's layers ask for their model-parallel group: one gloo rank, torn down after."""
    init = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    fs_init.initialize_model_parallel(1)
    yield
    fs_init.destroy_model_parallel()
    dist.destroy_process_group()


def reference(params, seed=0):
    """Meta's model with std-0.1 weights (its layers are built uninitialised) and unit-ish norm gains."""
    torch.manual_seed(seed)
    model = meta_model.Transformer(ModelArgs(max_seq_len=SEQ_LEN, max_batch_size=2, **params))
    return randomize_(model, seed).eval()


def ids(vocab_size, seed=1):
    return torch.randint(0, vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def write_meta_dir(path, params, shards):
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return path


def max_diff(ours, meta, idx):
    with torch.no_grad():
        got, _ = ours.eval()(idx)
    return (got - meta(idx, 0)).abs().max().item()


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_meta_checkpoint_loads_with_reference_logits(attn_impl, tmp_path):
    meta = reference(PARAMS)
    path = write_meta_dir(tmp_path, PARAMS, [meta.state_dict()])
    ours = Transformer.from_pretrained(path, attn_impl=attn_impl)
    cfg = ours.cfg
    assert (cfg.rope_factor, cfg.rope_original_block_size, cfg.intermediate_size) == (8.0, 8192, 224)
    assert not cfg.tie_embeddings and cfg.block_size == 131072
    assert max_diff(ours, meta, ids(PARAMS["vocab_size"])) <= 1e-4


def test_tied_checkpoint_without_output_weight(tmp_path):
    # Llama 3.2 1B/3B: lm_head is the embedding, and Meta's file has no output.weight
    params = dict(PARAMS, use_scaled_rope=False, rope_theta=10000.0)
    meta = reference(params, seed=2)
    with torch.no_grad():
        meta.output.weight.copy_(meta.tok_embeddings.weight)
    state = {k: v for k, v in meta.state_dict().items() if k != "output.weight"}
    ours = Transformer.from_pretrained(write_meta_dir(tmp_path, params, [state]))
    assert ours.cfg.tie_embeddings and ours.cfg.rope_factor is None and ours.cfg.block_size == 8192
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert max_diff(ours, meta, ids(params["vocab_size"])) <= 1e-4


def test_model_parallel_shards_concatenate(tmp_path):
    # two shards as llama-models' reshard_mp cuts them for two ranks: rows of wq/wk/wv/w1/w3/output and
    # the embedding, columns of wo/w2, norms whole
    meta = reference(PARAMS, seed=3)
    full = meta.state_dict()
    shards = [reshard_mp([full], size=2, rank=r) for r in range(2)]
    assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)
    ours = Transformer.from_pretrained(write_meta_dir(tmp_path, PARAMS, shards))
    assert max_diff(ours, meta, ids(PARAMS["vocab_size"])) <= 1e-4


def test_ours_to_meta_loads_in_reference(tmp_path):
    ours = randomize_(Transformer(hf.config_from_meta(PARAMS)), seed=4)
    hf.save_meta(ours, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    meta = meta_model.Transformer(ModelArgs(max_seq_len=SEQ_LEN, max_batch_size=2, **params)).eval()
    meta.load_state_dict(torch.load(tmp_path / "consolidated.00.pth", weights_only=True), strict=True)
    assert max_diff(ours, meta, ids(PARAMS["vocab_size"])) <= 1e-4
    reloaded = Transformer.from_pretrained(tmp_path)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_params_json_fields(tmp_path):
    # Llama 3.2's factor 32, when a params.json names it; Meta's published 3.2 files do not, and
    # Meta's reference then scales by 8 (transformers' converter writes 32): an override chooses
    cfg = hf.config_from_meta(dict(PARAMS, rope_scaling_factor=32.0))
    assert cfg.rope_factor == 32.0
    assert hf.config_from_meta(PARAMS, rope_factor=32.0).rope_factor == 32.0
    # the published 8B params.json gives the 8B preset
    llama31_8b = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)  # fmt: skip
    assert hf.config_from_meta(llama31_8b) == hf.Config.llama31_8b()
    with pytest.raises(ValueError, match="vision or MoE"):
        hf.config_from_meta(dict(PARAMS, vision_chunk_size=560))
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(FileNotFoundError, match=r"no consolidated\.\*\.pth"):
        Transformer.from_pretrained(tmp_path)


def test_more_shards_than_kv_heads_is_refused(tmp_path):
    full = reference(PARAMS, seed=5).state_dict()
    shards = [reshard_mp([full], size=4, rank=r, repeat_qk_qv=2) for r in range(4)]
    with pytest.raises(ValueError, match="4 model-parallel shards but 2 key/value heads; reshard"):
        Transformer.from_pretrained(write_meta_dir(tmp_path, PARAMS, shards))
