"""The package's layers (docs/architecture.md): who imports whom, and no CPU machinery in GPU/TPU programs."""

import ast
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import resattn_jax
from resattn_jax.ops.cpu import custom_calls
from resattn_jax.training import loop
from resattn_jax.training.optim import create_optimizer, default_optimizer_config

PACKAGE = os.path.dirname(resattn_jax.__file__)
LAYERS = ("ops", "models", "training", "tools")  # each may import only those before it


def _imports(path: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = "resattn_jax." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
    package = module.rsplit(".", 1)[0]  # the package a relative import starts from
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base != "resattn_jax":  # `from resattn_jax import X` is judged by X below
                names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return names


def _layer_files(layer: str):
    for root, _, files in os.walk(os.path.join(PACKAGE, layer)):
        yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "resattn_jax" or n.startswith("resattn_jax.")}


def test_the_walk_sees_imports():
    units = _ours(_imports(os.path.join(PACKAGE, "models", "units.py")))
    assert "resattn_jax.ops" in units and "resattn_jax.ops.norm_relu" in units
    assert _ours(_imports(os.path.join(PACKAGE, "ops", "backend.py"))) >= {"resattn_jax.ops.cpu.custom_calls"}


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below(layer):
    above = LAYERS[LAYERS.index(layer) + 1:]
    for path in _layer_files(layer):
        bad = {n for n in _ours(_imports(path))
               if n == "resattn_jax" or any(n.startswith(f"resattn_jax.{up}") for up in above)
               or n.split(".")[1] not in LAYERS}  # nor the package root or its old-name aliases
        assert not bad, f"{os.path.relpath(path, PACKAGE)} imports {sorted(bad)}"


def test_models_import_nothing_cpu_specific():
    for path in _layer_files("models"):
        names = _imports(path)
        bad = {n for n in _ours(names) if n.startswith(("resattn_jax.ops.cpu", "resattn_jax.ops.backend"))}
        bad |= names & {"ctypes", "subprocess"}
        assert not bad, f"{os.path.relpath(path, PACKAGE)} imports {sorted(bad)}"


def test_only_the_backend_module_imports_the_cpu_kernels():
    for layer in LAYERS:
        for path in _layer_files(layer):
            if path.startswith(os.path.join(PACKAGE, "ops", "cpu")) or path.endswith(os.path.join("ops", "backend.py")):
                continue
            cpu = {n for n in _ours(_imports(path)) if n.startswith("resattn_jax.ops.cpu")}
            assert not cpu, f"{os.path.relpath(path, PACKAGE)} imports {sorted(cpu)}; ask resattn_jax.ops.backend"


def test_config_files_load_without_tensorflow():
    # Flags are parsed (and config files run) before anything else: TensorFlow is the input
    # pipeline's, loaded when the first batch is read.
    code = """
        import glob, importlib, os, sys
        for path in sorted(glob.glob("configs/*.py")):
            name = os.path.basename(path)[:-3]
            if name != "__init__":
                importlib.import_module(f"configs.{name}").get_config()
        print([m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "sklearn")])
    """
    root = os.path.dirname(PACKAGE)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_importing_the_models_loads_no_training_tools_or_tensorflow():
    code = """
        import sys
        import resattn_jax, resattn_jax.models
        loaded = [m for m in sys.modules if m.startswith(("resattn_jax.training", "resattn_jax.tools", "tensorflow"))]
        print(loaded)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def traced_steps():
    """Train and eval steps of a small network whose last stage is wide enough (64-channel 3x3
    convolutions on 8x8 maps, batch 16) for the CPU's Winograd choice, traced once."""
    net = resattn_jax.create_model("tiny", stage_widths=(16, 32, 256), final_width=256)
    optimizer, schedule = create_optimizer(default_optimizer_config(), 16)
    state = jax.eval_shape(lambda: loop._initial_state(net, optimizer, (32, 32, 3), 0))
    batch = {"image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((16,), jnp.int32), "mask": jax.ShapeDtypeStruct((16,), bool)}
    return {"train": jax.jit(loop.make_train_step(schedule)).trace(state, batch),
            "eval": jax.jit(loop.make_eval_step()).trace(state, batch)}


def _lowered(traced, platform: str) -> str:
    return traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True)


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_cpu_lowering_has_the_fast_paths(traced_steps, kind):
    # The control for the test below: the same traced steps lowered for CPU do use them.
    text = _lowered(traced_steps[kind], "cpu")
    assert "winograd" in text and "resattn_batched_matmul" in text
    if kind == "train":
        assert all(target in text for target in custom_calls.TARGETS)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("kind", ["train", "eval"])
def test_gpu_and_tpu_programs_contain_no_cpu_machinery(traced_steps, kind, platform):
    text = _lowered(traced_steps[kind], platform)
    assert not [target for target in custom_calls.TARGETS if target in text]
    assert "winograd" not in text  # the named scope of every Winograd transform
    assert "stablehlo.convolution" in text


def test_a_non_cpu_process_never_traces_or_loads_the_cpu_paths(monkeypatch):
    """Where the default backend is a GPU or TPU, tracing the model neither loads the extension nor
    traces a CPU branch at all (lax.platform_dependent would drop it later, but its Python would run)."""
    from resattn_jax.ops import backend

    def must_not_load():
        raise AssertionError("the CPU custom calls were loaded by a non-CPU process")

    net = resattn_jax.create_model("tiny", stage_widths=(16, 32, 256), final_width=256)
    variables = jax.jit(lambda: net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))()
    images = jnp.zeros((16, 32, 32, 3))
    monkeypatch.setattr(backend.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(custom_calls, "load", must_not_load)

    def loss(params):
        logits, _ = net.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return jnp.sum(logits)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    assert "platform_index" not in jaxpr and "resattn_" not in jaxpr  # no CPU branch traced
    monkeypatch.undo()
    assert "platform_index" in str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))  # the control
