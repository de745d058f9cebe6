"""Copy consistency: a component a model shares with a sibling is byte-identical in both, so
`diff gpt2/model.py llama31/model.py` (or hf.py) shows only what the architecture changes. A deliberate
deviation is not listed here and carries a `# diff vs <sibling>: <why>` comment instead."""

import ast
import importlib
import inspect
from pathlib import Path

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
    "loss_chunk_rows": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
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
    "hf.CheckpointError": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.hub_download_hint": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "hf.check_checkpoint_dir": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
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


# train.py and infra.py. A definition a model changes or adds on purpose is marked: its first line (or
# the line above it) carries `# diff vs <sibling>: <why>`. Nothing unmarked may drift or hide.
ROOT = Path(__file__).resolve().parents[1]
MARK = "# diff vs "
PACKAGES = sorted({m.package for m in MODELS})


def definitions(text):
    """{name: (source, marked)} of a module's top-level functions, classes and assignments, and of each
    class's methods as "Class.method"; decorators belong to the definition."""
    lines = text.splitlines()

    def entry(node):
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        marked = any(MARK in line for line in lines[max(0, first - 2) : first])
        return "\n".join(lines[first - 1 : node.end_lineno]), marked

    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            found[node.name] = entry(node)
        if isinstance(node, ast.ClassDef):
            found |= {f"{node.name}.{f.name}": entry(f) for f in node.body if isinstance(f, ast.FunctionDef)}
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found |= {t.id: entry(node) for t in targets if isinstance(t, ast.Name)}
    return found


def module_text(package, module):
    return (ROOT / package / f"{module}.py").read_text()


# train.py: every model's script is gpt2/train.py with its own docstring and model import. What a model
# changes about training goes into the extension points, identical in name and signature everywhere.
EXTENSION_POINTS = {"make_optimizer", "TrainingExtras"}
# per-model data, not code: the preset names, the published training recipes of each model's presets
MODEL_TABLES = {"PRESETS", "TRAINING_DEFAULTS"}
# the longest each train.py may grow (issue #20): the recipe read top to bottom, the machinery in infra.py
TRAIN_LINE_TARGETS = {"gpt2": 450, "llama31": 450, "qwen3": 450, "deepseek3": 520, "kimi_k2": 650}


def signature(text, name):
    """An extension point's interface: a function's arguments, or a class's methods and theirs."""
    node = next(n for n in ast.parse(text).body if getattr(n, "name", None) == name)
    if isinstance(node, ast.ClassDef):
        return {f.name: ast.unparse(f.args) for f in node.body if isinstance(f, ast.FunctionDef)}
    return ast.unparse(node.args)


def skeleton_problems(template_text, text):
    """What keeps a train.py from being gpt2's skeleton: a missing name, an added one left unmarked, a
    shared one that drifted, an extension point whose signature changed. [] when it is."""
    template, ours = definitions(template_text), definitions(text)
    exempt = EXTENSION_POINTS | MODEL_TABLES
    top = lambda names: {n for n in names if "." not in n or n.split(".")[0] not in exempt}  # noqa: E731
    problems = [f"missing {name}" for name in sorted(top(template) - set(ours))]
    # a marked added class's methods are part of that marked addition
    marked = lambda name: ours[name][1] or ("." in name and ours.get(name.split(".")[0], (None, False))[1])  # noqa: E731
    problems += [f"unmarked extra {name}" for name in sorted(top(ours) - set(template)) if not marked(name)]
    shared = (top(template) & set(ours)) - exempt
    problems += [f"{name} differs" for name in sorted(shared) if ours[name][0] != template[name][0]]
    points = EXTENSION_POINTS & set(ours) & set(template)
    problems += [
        f"{name} changed its signature"
        for name in sorted(points)
        if signature(text, name) != signature(template_text, name)
    ]
    return problems


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "gpt2"])
def test_train_scripts_share_the_gpt2_skeleton(package):
    problems = skeleton_problems(module_text("gpt2", "train"), module_text(package, "train"))
    assert not problems, f"{package}/train.py against gpt2/train.py: {problems}; re-copy, or mark the change"


def test_train_scripts_within_their_line_targets():
    over = {
        p: n for p, target in TRAIN_LINE_TARGETS.items() if (n := len(module_text(p, "train").splitlines())) > target
    }
    assert not over, f"train.py over its line target {TRAIN_LINE_TARGETS}: {over}; move plumbing into infra.py"


@pytest.mark.parametrize("package", PACKAGES)
def test_train_py_spells_out_the_model_presets(package):
    """train.py names the presets itself, to parse its arguments before importing torch: the same as Config's."""
    train, model = importlib.import_module(f"{package}.train"), importlib.import_module(f"{package}.model")
    assert train.PRESETS == model.Config.PRESETS


def test_the_skeleton_check_catches_drift_and_unmarked_additions():
    """The check itself: gpt2's own train.py passes; an added function passes only when marked, a
    changed shared function or extension-point signature never does."""
    text = module_text("gpt2", "train")
    assert skeleton_problems(text, text) == []
    added = "def probe():\n    return 1\n"
    assert skeleton_problems(text, text + "\n\n" + added) == ["unmarked extra probe"]
    assert skeleton_problems(text, text + "\n\n# diff vs gpt2: a probe\n" + added) == []
    assert skeleton_problems(text, text + "\n\n# a probe\n" + added) == ["unmarked extra probe"]
    added_class = "class Probe:\n    def run(self):\n        return 1\n"
    assert skeleton_problems(text, text + "\n\n# diff vs gpt2: a probe\n" + added_class) == []
    assert skeleton_problems(text, text + "\n\n" + added_class) == ["unmarked extra Probe", "unmarked extra Probe.run"]
    drifted = text.replace("return args.lr * (step + 1) / args.warmup_steps", "return args.lr")
    assert skeleton_problems(text, drifted) == ["lr_at differs"]
    reshaped = text.replace("def after_step(self, model):", "def after_step(self, model, step):")
    assert skeleton_problems(text, reshaped) == ["TrainingExtras changed its signature"]
    assert skeleton_problems(text, text.replace("def lr_at(", "def learning_rate_at(")) == [
        "missing lr_at",
        "unmarked extra learning_rate_at",
    ]


# infra.py: row -> the packages holding identical copies of a component (a top-level name, or
# Class.method). Where the siblings hold two versions of one component, a second row names the
# variant in parentheses, e.g. "norm_bytes (RMSNorm)". Every definition of every infra.py is in a row
# for its package or marked `# diff vs <sibling>: <why>`; a marked change copied on to a later sibling
# gets a variant row, so its copies cannot drift apart either.
INFRA_COPIES = {
    # the Config from the arguments
    "config_from_args": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "pretrained_config": ["gpt2", "qwen3", "deepseek3", "kimi_k2"],  # llama31 also reads Meta's own layout
    "parse_overrides": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "parse_field": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    # the model built on the meta device and wrapped
    "build_model": ["gpt2", "llama31", "qwen3"],
    "build_model (MTP)": ["deepseek3", "kimi_k2"],  # MTP modules checkpointed, compiled as blocks
    "shard_model": ["gpt2", "llama31", "qwen3"],
    "shard_model (MTP, biased routers)": ["deepseek3", "kimi_k2"],
    "biased_routers": ["deepseek3", "kimi_k2"],  # gathered in fp32, each its own group
    "local_part": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "init_parameters": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "load_pretrained": ["gpt2", "qwen3", "deepseek3", "kimi_k2"],  # llama31 also reads Meta's own layout
    "copy_part": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "rows_kept": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "set_gradient_sync": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "all_mean": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    # the memory plan: the architecture enters through its per-module terms
    "plan_memory": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "memory_plan": ["gpt2", "llama31", "qwen3", "deepseek3"],  # kimi_k2: MuonClip's state
    "memory_plan (Muon)": ["kimi_k2"],
    "optimizer_bytes": ["kimi_k2"],  # Muon's one momentum buffer, AdamW's two moments
    "is_hidden_matrix": ["kimi_k2"],  # the matrices Muon updates
    "local_numel": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "fsdp_groups": ["gpt2", "llama31", "qwen3"],
    "fsdp_groups (MTP, biased routers)": ["deepseek3", "kimi_k2"],
    "transient_bytes": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "activation_bytes": ["gpt2", "llama31", "qwen3"],
    "activation_bytes (MTP)": ["deepseek3", "kimi_k2"],
    "mtp_bytes_per_token": ["deepseek3", "kimi_k2"],
    "block_bytes_per_token": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "norm_bytes": ["gpt2"],  # LayerNorm
    "norm_bytes (RMSNorm)": ["llama31", "qwen3", "deepseek3", "kimi_k2"],
    "attention_bytes_per_token": ["gpt2"],  # llama31: grouped-query; qwen3: and QK-Norm
    "attention_bytes_per_token (MLA)": ["deepseek3", "kimi_k2"],
    "mlp_bytes_per_token": ["gpt2"],  # llama31: SwiGLU; qwen3: and MoE layers
    "mlp_bytes_per_token (shared experts)": ["deepseek3", "kimi_k2"],
    "GIB": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "gib": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "describe_memory": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "device_memory": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "check_memory": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    # data and tokenizer
    "data_loaders": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "Prefetcher": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "load_tokenizer_for": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "default_tokenizer": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    # the loop's figures, read only where it may wait for the device
    "StepFigures": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    # checkpoints and the run directory
    "CHECKPOINT_NAMES": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "RUN_SETTINGS": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "SCHEDULE_SETTINGS": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "checkpoint_path": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "find_checkpoint": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "temp_path": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "write_file": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "replace_dir": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "remove_leftovers": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "rng_state": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "save_checkpoint": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "read_meta": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "load_checkpoint": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "run_settings": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "differences": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "check_resumable": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "truncate_metrics": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
    "Run": ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"],
}


def component(row):
    """The component a row of INFRA_COPIES checks: its name, less the variant."""
    return row.split(" (")[0]


def unlisted(package, listed):
    """Definitions of <package>/infra.py neither in a row for it nor marked: drift that could hide.
    A class counts as listed when it is, or when each of its methods is (listed or marked)."""
    found = definitions(module_text(package, "infra"))
    rows = {component(row) for row, packages in listed.items() if package in packages}
    covered = {name for name, (_, marked) in found.items() if marked or name in rows}
    classes = {name.split(".")[0] for name in found if "." in name}
    for cls in classes - covered:
        if all(name in covered for name in found if name.startswith(f"{cls}.")):
            covered.add(cls)
    return sorted(name for name in found if "." not in name and name not in covered)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_infra_definition_is_listed_or_marked(package):
    missing = unlisted(package, INFRA_COPIES)
    assert not missing, f"{package}/infra.py: {missing} are in no INFRA_COPIES row for {package} and not marked"


@pytest.mark.parametrize("row", sorted(INFRA_COPIES))
def test_infra_copies_are_identical(row):
    packages, name = INFRA_COPIES[row], component(row)
    for package in packages:
        assert (ROOT / package / "infra.py").exists(), f"INFRA_COPIES lists {package}, which has no infra.py"
    sources = {p: definitions(module_text(p, "infra")).get(name, (None,))[0] for p in packages}
    absent = [p for p, text in sources.items() if text is None]
    assert not absent, f"{name}: not defined in {absent}'s infra.py"
    drifted = [p for p in packages[1:] if sources[p] != sources[packages[0]]]
    assert not drifted, f"{row} in {drifted} differs from {packages[0]}'s; re-copy it or mark the deviation"


def test_the_infra_listing_catches_an_unlisted_definition():
    """The coverage check itself, on gpt2's infra.py: drop a row and its definition is reported."""
    assert unlisted("gpt2", INFRA_COPIES) == []
    assert unlisted("gpt2", {k: v for k, v in INFRA_COPIES.items() if k != "norm_bytes"}) == ["norm_bytes"]
    assert unlisted("gpt2", {k: v for k, v in INFRA_COPIES.items() if k != "Run"}) == ["Run"]
