import numpy as np
import pytest

from shared.data import write_shard


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """Token shards a tiny model learns in a few steps: each token is followed by its successor
    in a fixed permutation of 0..95, with 10% random tokens mixed in. Ids fit every test vocab."""
    rng = np.random.default_rng(0)
    vocab, n = 96, 60_000
    successor = rng.permutation(vocab)
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = 0
    noise = rng.random(n) < 0.1
    random_tokens = rng.integers(0, vocab, n)
    for i in range(1, n):
        tokens[i] = random_tokens[i] if noise[i] else successor[tokens[i - 1]]
    path = tmp_path_factory.mktemp("toy_data")
    write_shard(path / "toy_train_000000.bin", tokens[: n * 9 // 10])
    write_shard(path / "toy_val_000000.bin", tokens[n * 9 // 10 :])
    return path


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """A post-training main() run in-process sets torch's thread count (--threads); the next test gets its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
