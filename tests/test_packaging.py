"""The wheel: every model, shared/ and posttrain/ under one namespace, minllm/, usable from outside
the checkout. The wheel is built and unpacked into a temporary folder; each check runs in a
subprocess whose working directory is outside the checkout and whose sys.path holds that folder
and the environment's site-packages, without the site module, so the editable install's .pth
(which puts the checkout on sys.path) is never read."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2")
PACKAGES = (*MODELS, "shared", "posttrain")
POSTTRAIN = ("sft", "dpo", "ppo", "grpo", "yarn")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` names its own binary in $UV
    if not uv:
        pytest.skip("building the wheel needs uv")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("minllm-*.whl")
    return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory):
    """The wheel's files, unpacked as an installer would put them into site-packages (it is pure Python)."""
    folder = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    return folder


def run_outside(site, args, tmp_path):
    """Run the environment's Python on args with cwd tmp_path and sys.path = [cwd, site, site-packages,
    stdlib]: -S skips site, so no .pth file puts the checkout on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]))
    result = subprocess.run([sys.executable, "-S", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_wheel_holds_only_the_minllm_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = {entry for entry in top if entry.endswith(".dist-info")}
    assert len(dist_info) == 1 and top - dist_info == {"minllm"}, sorted(top)
    expected = {f"minllm/{model}/{file}.py" for model in MODELS for file in ("__init__", "model", "hf", "train")}
    expected |= {f"minllm/posttrain/{module}.py" for module in POSTTRAIN}
    expected |= {"minllm/__init__.py", "minllm/shared/data.py", "minllm/shared/assets/shakespeare.txt"}
    assert expected <= set(names), sorted(expected - set(names))


def test_every_model_imports_and_runs_from_the_wheel(site, tmp_path):
    code = f"""
        import importlib, sys
        import torch
        site = {str(site)!r}
        for name in {MODELS!r}:
            model, hf = (importlib.import_module(f"minllm.{{name}}.{{file}}") for file in ("model", "hf"))
            # the scripts' absolute imports: train.py's `from {{name}}.infra import ...`, infra.py's `from {{name}} import hf`
            train, infra = (importlib.import_module(f"minllm.{{name}}.{{file}}") for file in ("train", "infra"))
            for module in (model, hf, train, infra):
                assert module.__file__.startswith(site), module.__file__
            assert infra.hf is hf  # one module object, whichever name imported it
            torch.manual_seed(0)
            net = model.Transformer(model.Config.tiny())
            idx = torch.randint(0, net.cfg.vocab_size, (1, 8))
            logits = net(idx)[0]
            assert logits.shape[:2] == (1, 8) and torch.isfinite(logits).all(), name
            print(name, "ok")
        import minllm.shared.data, minllm.shared.tokenizer
        assert minllm.shared.data.__file__.startswith(site)
        # the aliases serve minllm's own imports; this script is not minllm, and gets no `shared`
        # unless minllm's scripts imported it first (they did: train.py's `from shared.data import ...`)
        import shared
        assert shared is minllm.shared
        assert "tests" not in sys.modules
        """
    out = run_outside(site, ["-c", textwrap.dedent(code)], tmp_path)
    assert out.split() == [word for name in MODELS for word in (name, "ok")]


def test_user_module_named_like_a_package_is_not_shadowed(site, tmp_path):
    (tmp_path / "shared.py").write_text("MINE = True\n")
    code = "import minllm.gpt2.model, shared; assert shared.MINE; import minllm.shared; print(minllm.shared.__file__)"
    assert run_outside(site, ["-c", code], tmp_path).startswith(str(site))
    code = "import minllm.gpt2.model\ntry:\n    import llama31\nexcept ImportError:\n    print('absent')"
    assert run_outside(site, ["-c", code], tmp_path).strip() == "absent"  # not aliased for outside code


def test_train_script_runs_as_a_module_of_the_wheel(site, tmp_path):
    out = run_outside(site, ["-m", "minllm.gpt2.train", "--help"], tmp_path)
    assert "usage:" in out and "--max-steps" in out


def test_posttrain_runs_from_the_wheel(site, tmp_path):
    code = f"""
        import importlib, runpy, sys
        for name in {POSTTRAIN!r}:
            assert importlib.import_module(f"minllm.posttrain.{{name}}").__file__.startswith({str(site)!r})
        sys.argv = ["sft", "--help"]
        runpy.run_module("minllm.posttrain.sft", run_name="__main__", alter_sys=True)
        """
    out = run_outside(site, ["-c", textwrap.dedent(code)], tmp_path)
    assert "usage:" in out
