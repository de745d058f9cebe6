"""--init-from reads per process: under FSDP each of 2 gloo ranks reads from the safetensors files only
the rows it keeps of every tensor the conversion merely renames (counted through a wrapper around
safe_open); and llama31's --init-from takes Meta's own directory (params.json + consolidated.NN.pth)
with the logits of the same weights saved in the Hugging Face layout."""

import pytest
import torch

from registry import by_name, randomize_
from test_scale import CPU, build_args, on_ranks


class CountingSafeOpen:
    """safe_open that adds the number of elements each get_slice(...)[rows] or get_tensor reads to
    `counts`, by HF name."""

    def __init__(self, real, counts):
        self.real, self.counts = real, counts

    def __call__(self, *args, **kwargs):
        return CountingFile(self.real(*args, **kwargs), self.counts)


class CountingFile:
    def __init__(self, file, counts):
        self.file, self.counts = file, counts

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_tensor(self, name):
        return self.count(name, self.file.get_tensor(name))

    def get_slice(self, name):
        return CountingSlice(self, name, self.file.get_slice(name))

    def count(self, name, tensor):
        self.counts[name] = self.counts.get(name, 0) + tensor.numel()
        return tensor


class CountingSlice:
    def __init__(self, file, name, real):
        self.file, self.name, self.real = file, name, real

    def get_shape(self):
        return self.real.get_shape()

    def __getitem__(self, index):
        return self.file.count(self.name, self.real[index])


def _count_reads(rank, spec, path, out):
    counts = {}
    hf = spec.hf
    hf.safe_open = CountingSafeOpen(hf.safe_open, counts)  # a forked rank: the parent's module is untouched
    model, _ = spec.infra.build_model(build_args(parallel="fsdp", init_from=str(path)), spec.config(), CPU, None)
    kept = sum(p.to_local().numel() for p in model.parameters())  # a tied head once: read once
    torch.save((counts, kept), out / f"rank{rank}.pt")


# llama31: every tensor of its checkpoint is renamed (qwen3's dense layers: the same); qwen3_moe: its
# experts, one matrix each in the files, are stacked: a rank reads only its experts
@pytest.mark.parametrize("name", ["llama31", "qwen3_moe"])
def test_each_rank_reads_only_the_rows_it_keeps(name, tmp_path):
    spec = by_name(name)
    source = randomize_(spec.build(seed=3))
    source.save_pretrained(tmp_path / "hf", max_shard_bytes=20_000)
    on_ranks(_count_reads, spec, tmp_path / "hf", tmp_path)
    full = sum(t.numel() for t in source.state_dict().values())
    for rank in range(2):
        counts, kept = torch.load(tmp_path / f"rank{rank}.pt")
        assert sum(counts.values()) == kept  # not one element more than its shard
        assert kept < 0.6 * full


def test_a_transformed_tensor_is_read_whole_and_a_dropped_one_not_at_all(tmp_path):
    """GPT-2's fused c_attn has rows of q, k and v: it is read whole; a tied model's lm_head is not read."""
    spec = by_name("gpt2")
    source = randomize_(spec.build(seed=3))
    assert source.cfg.tie_embeddings
    source.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # as some hub checkpoints hold it
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    on_ranks(_count_reads, spec, tmp_path / "hf", tmp_path)
    counts, _ = torch.load(tmp_path / "rank0.pt")
    assert counts["transformer.h.0.attn.c_attn.weight"] == state["transformer.h.0.attn.c_attn.weight"].numel()
    assert counts["transformer.wte.weight"] < 0.6 * state["transformer.wte.weight"].numel()
    assert "lm_head.weight" not in counts


def logits_after_init_from(spec, path, idx, parallel="none"):
    cfg = spec.infra.pretrained_config(str(path))
    model, _ = spec.infra.build_model(build_args(parallel=parallel, init_from=str(path)), cfg, CPU, None)
    with torch.no_grad():
        return model(idx)[0]


def _meta_logits_under_fsdp(rank, spec, path, idx, out):
    logits = logits_after_init_from(spec, path, idx, parallel="fsdp")
    if rank == 0:
        torch.save(logits, out)


@pytest.mark.parametrize("tied", [False, True])
def test_init_from_a_meta_directory_gives_the_hugging_face_directorys_logits(tied, tmp_path):
    spec = by_name("llama31")
    # Meta's params.json has no context length and a fixed RoPE scaling: a config it can express
    source = randomize_(spec.build(seed=3, rope_factor=None, block_size=8192, tie_embeddings=tied))
    source.save_pretrained(tmp_path / "hf")
    spec.hf.save_meta(source, tmp_path / "meta")
    idx = torch.randint(0, source.cfg.vocab_size, (2, 12))
    expected = logits_after_init_from(spec, tmp_path / "hf", idx)
    torch.testing.assert_close(logits_after_init_from(spec, tmp_path / "meta", idx), expected, rtol=0, atol=0)
    if tied:  # the same code under FSDP; one run of 2 ranks keeps the file fast
        return
    on_ranks(_meta_logits_under_fsdp, spec, tmp_path / "meta", idx, tmp_path / "fsdp.pt")
    torch.testing.assert_close(torch.load(tmp_path / "fsdp.pt"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_other_models_refuse_a_meta_directory_in_one_line(name, tmp_path):
    by_name("llama31").hf.save_meta(randomize_(by_name("llama31").build(rope_factor=None)), tmp_path)
    with pytest.raises(SystemExit, match="no config.json there"):
        by_name(name).infra.pretrained_config(str(tmp_path))
