"""benchmarks/device_check.py: the dry run (as CI runs it, with TensorFlow, tensorflow-datasets and
scikit-learn blocked: import hygiene), its output schema, and the sweep logic an accelerator needs."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
WHEELS = REPO / "benchmarks" / "device_wheels.txt"
#: Absent on the device machine (or never needed by a step or a benchmark): imports raise ImportError.
BLOCKED = ("tensorflow", "tensorflow_datasets", "sklearn", "tensorboardX", "matplotlib", "torch")
#: What the device machine has installed, with everything these require.
DEVICE_HAS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
#: Imported only where the run's devices are CPUs (the custom calls' BLAS; never on an accelerator).
CPU_ONLY = {"scipy_openblas64"}

# Runs the script with BLOCKED made unimportable and records the top-level module of every import
# statement executed by our own code (the script and resattn_jax.*).
CHILD = r"""
import builtins, json, runpy, sys
script, report, blocked = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
for name in blocked:
    sys.modules[name] = None
direct = set()
real_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and (importer == "__main__" or importer.startswith("resattn_jax")):
        direct.add(name.split(".")[0])
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = recording_import
sys.argv = [script, *sys.argv[4:]]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(report, "w") as f:
        json.dump(sorted(direct), f)
"""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_closure(roots) -> set[str]:
    """Distribution names required, transitively, by ``roots`` (extras left out)."""
    seen, todo = set(), [_normalise(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requirements:
            if "extra ==" not in requirement:
                todo.append(_normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()))
    return seen


def _wheel_names() -> list[str]:
    lines = [line.split("#")[0].strip() for line in WHEELS.read_text().splitlines()]
    return [re.split(r"[=<>!~ ]", line)[0] for line in lines if line]


def _allowed_modules() -> set[str]:
    dists = _requirement_closure(DEVICE_HAS) | {_normalise(n) for n in _wheel_names()}
    allowed = {module for module, owners in importlib.metadata.packages_distributions().items()
               if any(_normalise(owner) in dists for owner in owners)}
    return allowed | set(sys.stdlib_module_names) | {"__future__", "resattn_jax"} | CPU_ONLY


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    imports = out / "imports.json"
    env = child_env()  # one CPU device, as a plain run
    proc = subprocess.run([sys.executable, "-c", CHILD, str(SCRIPT), str(imports), ",".join(BLOCKED),
                           "--dry-run", "--profile", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd="/")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] \
        if (out / "results.jsonl").exists() else []
    return {"proc": proc, "out": out, "records": records,
            "imports": json.loads(imports.read_text()) if imports.exists() else None}


def test_dry_run_passes_with_tensorflow_tfds_sklearn_blocked(dry_run):
    proc = dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_mode = {(r["section"], r["status"]) for r in dry_run["records"]}
    # The micro model's bench ran in train and eval mode, with the blocked modules unimportable.
    assert ("train", "ok") in by_mode and ("eval", "ok") in by_mode


def test_only_device_packages_and_listed_wheels_are_imported(dry_run):
    """Every third-party module our code imports is on the device machine or in device_wheels.txt."""
    assert dry_run["imports"] is not None, dry_run["proc"].stderr[-3000:]
    missing = sorted(set(dry_run["imports"]) - _allowed_modules())
    assert not missing, f"imported, but neither on the device nor in {WHEELS.name}: {missing}"
    assert "ml_collections" in dry_run["imports"] and "ml_collections" in _wheel_names()


SCHEMA = {
    "environment": {"date", "platform", "device_kind", "num_devices", "versions", "python", "xla_flags"},
    "numerics": {"model", "batch_size", "loss_accelerator", "loss_host", "tolerance", "update_tolerance", "passed",
                 "rel_error",
                 "worst_leaf_rel_error", "worst_leaf"},
    "train": {"model", "batch_size", "dtype", "remat", "mode", "images_per_sec", "step_ms_median", "compile_s",
              "tflops_per_sec", "mfu", "peak_memory_bytes", "compiled_peak_memory_bytes", "flops_per_step"},
    "op": {"op", "impl", "shape", "dtype", "ms", "speedup", "rel_diff_vs_ours"},
    "profile": {"path", "bytes", "files", "dropped"},
}
SCHEMA["eval"] = SCHEMA["train"]


def test_dry_run_records_and_table(dry_run):
    records, out = dry_run["records"], dry_run["out"]
    assert records, dry_run["proc"].stderr[-3000:]
    for r in records:
        assert {"section", "name", "status", "elapsed_s", "dry_run"} <= set(r) and r["dry_run"] is True
        assert r["status"] == "ok", r
        assert SCHEMA[r["section"]] <= set(r), (r["section"], SCHEMA[r["section"]] - set(r))
    sections = [r["section"] for r in records]
    assert sections[:2] == ["environment", "numerics"] and {"train", "eval", "op", "profile"} <= set(sections)
    numerics = records[1]
    assert numerics["passed"] and all(numerics["rel_error"][k] <= 1e-4 for k in ("params", "batch_stats", "loss"))
    assert numerics["rel_error"]["update"] <= 1e-2
    steps = [r for r in records if r["section"] in ("train", "eval")]
    assert {(r["dtype"], r["mode"], r["remat"]) for r in steps} == {
        ("bfloat16", "train", False), ("float32", "train", False), ("bfloat16", "eval", False),
        ("bfloat16", "train", True)}
    assert all(r["images_per_sec"] > 0 and r["flops_per_step"] > 0 for r in steps)
    ops = [r for r in records if r["section"] == "op"]
    assert {r["op"].split()[0] for r in ops} == {"upsample", "maxpool", "batchnorm+relu", "conv1x1"}
    assert all(r["rel_diff_vs_ours"] < 0.05 for r in ops if not r["op"].startswith("conv1x1")), ops
    profile = records[-1]  # last of all
    assert profile["section"] == "profile" and profile["files"]
    files = [out / name for name in profile["files"]]  # flat beside results.jsonl
    assert all(p.name.startswith("profile-b2-") and p.suffix == ".gz" for p in files)
    assert sum(p.stat().st_size for p in files) == profile["bytes"] < 16 * 2**20
    table = (out / "summary.md").read_text()
    assert "| step | status | step ms | images/s | compile s | TFLOP/s | MFU |" in table
    # The order an accelerator needs: numerics, the bf16 sweep, the ops, the other steps, the profile.
    order = [r["section"] for r in records]
    assert order.index("op") < max(i for i, r in enumerate(records) if r.get("dtype") == "float32"
                                   and r["section"] == "train")
    for r in records[1:]:
        assert r["name"].split(":")[0] in table or r.get("impl", "") in table


# ---------------------------------------------------------------------------- logic an accelerator needs
@pytest.fixture(scope="module")
def device_check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import device_check  # noqa: PLC0415
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return device_check


def test_sweep_stops_at_the_first_out_of_memory_and_remats_the_fastest(device_check, monkeypatch, tmp_path):
    calls = []

    def fake_run_benchmark(model, image_size, batch_size=8, dtype="float32", mode="train", remat=False, **kwargs):
        calls.append((batch_size, dtype, mode, remat))
        if batch_size >= 128 and mode == "train" and dtype == "bfloat16":
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.3GiB.")
        # Batch 32 is the fastest, so remat reruns 32, not the largest batch that fit.
        return {"batch_size": batch_size, "dtype": dtype, "mode": mode, "remat": remat,
                "images_per_sec": 1000.0 / batch_size, "step_ms_median": 1.0}

    monkeypatch.setattr(device_check.bench, "run_benchmark", fake_run_benchmark)
    report = device_check.Report(tmp_path, dry_run=False, budget_s=1e9)
    plan = device_check.PLANS["device"]
    device_check.other_steps(report, plan, device_check.bf16_sweep(report, plan))
    assert calls == [(32, "bfloat16", "train", False), (64, "bfloat16", "train", False),
                     (128, "bfloat16", "train", False), (64, "float32", "train", False),
                     (256, "bfloat16", "eval", False), (32, "bfloat16", "train", True)]
    assert [r["status"] for r in report.records] == ["ok", "ok", "oom", "ok", "ok", "ok"]
    assert "Out of memory" in report.records[2]["error"]
    assert "| attention56 bfloat16 train batch 128 | oom |" in (tmp_path / "summary.md").read_text()

    # Past the time budget nothing more starts; each measurement left is recorded as skipped.
    calls.clear()
    report = device_check.Report(tmp_path / "late", dry_run=False, budget_s=-1.0)
    device_check.other_steps(report, plan, device_check.bf16_sweep(report, plan))
    assert calls == [] and {r["status"] for r in report.records} == {"skipped"}


def test_profile_is_compressed_then_trimmed_to_the_limit(device_check, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "host.xplane.pb").write_bytes(os.urandom(3000))  # incompressible
    (tmp_path / "trace.json").write_bytes(b"{}" * 5000)  # compresses to almost nothing
    kept, dropped = device_check._fit_profile(tmp_path, limit=2000)
    assert dropped == ["a/host.xplane.pb.gz"] and list(kept) == ["trace.json.gz"]
    assert not (tmp_path / "trace.json").exists() and kept["trace.json.gz"] < 2000
