"""Copy consistency: a component a model shares with a sibling is byte-identical in both, so
`diff gpt2/model.py llama31/model.py` (or hf.py) shows only what the architecture changes. A deliberate
deviation is not listed here and carries a `# diff vs <sibling>: <why>` comment instead."""

import importlib
import inspect

import pytest

from registry import MODELS

# component (module-level name, or Class.method; "hf." + name for hf.py) -> the packages holding identical copies
COPIES = {
    "Config.from_preset": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "RMSNorm": ["llama31", "qwen3", "deepseek3", "kimi_k2"],
    "apply_rope": ["llama31", "qwen3"],
    "yarn_scaling": ["llama31", "qwen3"],
    "KVCache": ["gpt2", "llama31", "qwen3"],
    "causal_attention": ["gpt2", "llama31", "qwen3"],
    "MLP": ["llama31", "qwen3", "deepseek3", "kimi_k2"],
    "ChunkedCrossEntropy": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "linear_cross_entropy": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "LMHead": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "Transformer.init_buffers": ["llama31", "qwen3", "deepseek3", "kimi_k2"],
    "Transformer.reset_parameters": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "Transformer.init_parameter": ["gpt2", "llama31"],
    "Transformer.check_input": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "Transformer.make_cache": ["llama31", "qwen3"],
    "Transformer.generate": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "Transformer.flops_per_token": ["gpt2", "llama31"],
    "Transformer.from_pretrained": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "Transformer.save_pretrained": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "sample": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.yarn_from_hf": ["llama31", "qwen3"],
    "hf.yarn_to_hf": ["llama31", "qwen3"],
    "hf.read_config": ["gpt2", "llama31", "qwen3"],  # deepseek3 also reads the weights' headers (FP8, MTP)
    "hf.read_safetensors_dir": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.write_safetensors_dir": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.mismatches": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.load_state_dict_strict": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.load": ["gpt2", "qwen3"],  # llama31 also reads Meta's own format
    "hf.save": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.safetensors_layer_names": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.read_safetensors_layers": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.TouchedTensors": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.plan_conversion": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.read_layer_as_ours": ["gpt2", "llama31", "qwen3"],  # deepseek3: FP8 read per expert
    "hf.read_layers_as_ours": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.is_meta_dir": ["gpt2", "qwen3", "deepseek3", "kimi_k2"],  # llama31 recognises Meta's layout
    # DeepSeek-V3 keeps Qwen 3's MoE machinery (the router and the shared experts differ)
    "Block": ["qwen3", "deepseek3", "kimi_k2"],
    "MoE.experts_loop": ["qwen3", "deepseek3", "kimi_k2"],
    "MoE.experts_grouped": ["qwen3", "deepseek3", "kimi_k2"],
    "grouped_mm": ["qwen3", "deepseek3", "kimi_k2"],
    "padded_bmm": ["qwen3", "deepseek3", "kimi_k2"],
    "expert_load": ["qwen3", "deepseek3", "kimi_k2"],
    # Kimi K2 is DeepSeek-V3's architecture at another shape: all but Config and the config.json spelling
    # (hf.config_to_hf, hf.yarn_to_hf) is deepseek3's; tests/test_kimi_k2.py checks the components that
    # a row above already ties to other siblings (apply_rope, KVCache, hf.load, ...)
    "Config.__post_init__": ["deepseek3", "kimi_k2"],
    "Config.check_routing": ["deepseek3", "kimi_k2"],
    "Config.is_moe_layer": ["deepseek3", "kimi_k2"],
    "Config.tiny": ["deepseek3", "kimi_k2"],
    "precompute_rope": ["deepseek3", "kimi_k2"],
    "yarn_mscale": ["deepseek3", "kimi_k2"],
    "softmax_scale": ["deepseek3", "kimi_k2"],
    "latent_attention": ["deepseek3", "kimi_k2"],
    # Attention.naive and Transformer.forward: kimi_k2's also report QK-Clip's statistic, S_max per head (marked)
    "Attention.__init__": ["deepseek3", "kimi_k2"],
    "Attention.forward": ["deepseek3", "kimi_k2"],
    "Attention.absorbed": ["deepseek3", "kimi_k2"],
    "flash_mla_usable": ["deepseek3", "kimi_k2"],
    "flash_mla_attention": ["deepseek3", "kimi_k2"],
    "Router": ["deepseek3", "kimi_k2"],
    "MoE": ["deepseek3", "kimi_k2"],
    "sequence_balance_loss": ["deepseek3", "kimi_k2"],
    "MTP": ["deepseek3", "kimi_k2"],
    "Transformer.__init__": ["deepseek3", "kimi_k2"],
    "Transformer.mtp_loss": ["deepseek3", "kimi_k2"],
    "Transformer.num_params": ["deepseek3", "kimi_k2"],
    "Transformer.idle_expert_params": ["deepseek3", "kimi_k2"],
    "hf.config_from_hf": ["deepseek3", "kimi_k2"],
    "hf.refuse_unimplemented": ["deepseek3", "kimi_k2"],
    "hf.mtp_as_saved": ["deepseek3", "kimi_k2"],
    "hf.weight_dtypes": ["deepseek3", "kimi_k2"],
    "hf.hf_to_ours": ["deepseek3", "kimi_k2"],
    "hf.layer_to_ours": ["deepseek3", "kimi_k2"],
    "hf.ours_to_hf": ["deepseek3", "kimi_k2"],
    "hf.layer_to_hf": ["deepseek3", "kimi_k2"],
    "hf.check_quantization": ["deepseek3", "kimi_k2"],
    "hf.dequantize_fp8": ["deepseek3", "kimi_k2"],
    "hf.dequantize_state": ["deepseek3", "kimi_k2"],
    "hf.is_fp8": ["deepseek3", "kimi_k2"],
    "hf.refuse_fp8_without_scale": ["deepseek3", "kimi_k2"],
    "hf.read_rows": ["deepseek3", "kimi_k2"],
}


def source(package, component):
    """Source of component in <package>/model.py, or in <package>/hf.py for "hf.<name>"."""
    module, name = component.split(".", 1) if component.startswith("hf.") else ("model", component)
    obj = importlib.import_module(f"{package}.{module}")
    for part in name.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(obj)


@pytest.mark.parametrize("component", sorted(COPIES))
def test_copies_are_identical(component):
    packages = COPIES[component]
    reference = source(packages[0], component)
    drifted = [p for p in packages[1:] if source(p, component) != reference]
    assert not drifted, f"{component} in {drifted} differs from {packages[0]}'s; re-copy it or mark the deviation"


# train.py: every model's script is gpt2/train.py with its own docstring and model import. What a
# model changes about training goes into the extension points, identical in name and signature
# everywhere; nothing else may differ, the training loop included.
EXTENSION_POINTS = {"make_optimizer", "TrainingExtras"}
# per-model data, not code: the published training recipes of each model's presets
MODEL_TABLES = {"TRAINING_DEFAULTS"}


def train_definitions(package):
    """Top-level functions, classes and constants of <package>/train.py."""
    module = importlib.import_module(f"{package}.train")
    return {
        name: obj
        for name, obj in vars(module).items()
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__ or name.isupper()
    }


def interface(obj):
    """What the loop relies on: a function's signature, or a class's methods and their signatures."""
    if inspect.isclass(obj):
        return {name: str(inspect.signature(f)) for name, f in vars(obj).items() if inspect.isfunction(f)}
    return str(inspect.signature(obj))


def definition(obj):
    return inspect.getsource(obj) if inspect.isfunction(obj) or inspect.isclass(obj) else obj


@pytest.mark.parametrize("package", sorted({m.package for m in MODELS} - {"gpt2"}))
def test_train_scripts_share_the_gpt2_skeleton(package):
    template, ours = train_definitions("gpt2"), train_definitions(package)
    assert set(ours) == set(template), f"{package}/train.py defines {sorted(set(ours) ^ set(template))} unlike gpt2's"
    drifted = sorted(
        name
        for name in template
        if name not in EXTENSION_POINTS | MODEL_TABLES and definition(ours[name]) != definition(template[name])
    )
    assert not drifted, f"{package}/train.py: {drifted} differ from gpt2/train.py; re-copy them"
    reshaped = sorted(name for name in EXTENSION_POINTS if interface(ours[name]) != interface(template[name]))
    assert not reshaped, f"{package}/train.py: extension points {reshaped} changed their signatures"
