"""Copy consistency: a component a model shares with a sibling is byte-identical in both, so
`diff gpt2/model.py llama31/model.py` shows only what the architecture changes. A deliberate
deviation is not listed here and carries a `# diff vs <sibling>: <why>` comment instead."""

import importlib
import inspect

import pytest

# component (module-level name, or Class.method) -> the model packages holding identical copies
COPIES = {
    "Config.from_preset": ["gpt2", "llama31"],
    "RMSNorm": ["llama31"],
    "precompute_rope": ["llama31"],
    "apply_rope": ["llama31"],
    "KVCache": ["gpt2", "llama31"],
    "causal_attention": ["gpt2", "llama31"],
    "MLP": ["llama31"],
    "Transformer.reset_parameters": ["gpt2", "llama31"],
    "Transformer.check_input": ["gpt2", "llama31"],
    "Transformer.make_cache": ["llama31"],
    "Transformer.generate": ["gpt2", "llama31"],
    "Transformer.flops_per_token": ["gpt2", "llama31"],
    "Transformer.from_pretrained": ["gpt2", "llama31"],
    "Transformer.save_pretrained": ["gpt2", "llama31"],
    "sample": ["gpt2", "llama31"],
    "read_safetensors_dir": ["gpt2", "llama31"],
    "load_state_dict_strict": ["gpt2", "llama31"],
    "hf_to_ours": ["llama31"],
    "ours_to_hf": ["llama31"],
}


def source(package, component):
    obj = importlib.import_module(f"{package}.model")
    for part in component.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(obj)


@pytest.mark.parametrize("component", sorted(COPIES))
def test_copies_are_identical(component):
    packages = COPIES[component]
    reference = source(packages[0], component)
    drifted = [p for p in packages[1:] if source(p, component) != reference]
    assert not drifted, f"{component} in {drifted} differs from {packages[0]}/model.py; re-copy it or mark the deviation"
