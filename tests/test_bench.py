"""The benchmark command's library function: schema, both parallel modes, train and eval, FLOPs."""

import json

import jax
import pytest

from resattn_jax.tools import bench

MICRO_MACS_AT_32 = 2_375_840  # README model zoo (tests/test_docs.py checks it against the model)
MICRO_PARAMS_10_CLASSES = 3_314  # README model zoo
KEYS = {"images_per_sec", "step_ms_median", "compile_s", "flops_per_step", "mfu", "peak_memory_bytes",
        "peak_host_rss_bytes", "device_kind", "num_devices", "jax_version"}


@pytest.mark.parametrize("parallel_mode,mode,remat", [("jit", "train", False), ("pmap", "train", False),
                                                      ("jit", "eval", False), ("pmap", "eval", False),
                                                      ("jit", "train", True)])
def test_benchmark_figures(parallel_mode, mode, remat, monkeypatch):
    # The steps run and are timed, but the figures are derived from known times: 0.2 s and 0.3 s.
    real_time_steps = bench._time_steps
    monkeypatch.setattr(bench, "_time_steps", lambda run_one, steps, warmup: (
        real_time_steps(run_one, steps, warmup), [0.2, 0.3])[1])
    result = bench.run_benchmark("micro", image_size=32, batch_size=8, parallel_mode=parallel_mode, mode=mode, steps=2,
                                 warmup=1, num_classes=10, peak_tflops=0.39, remat=remat)
    assert KEYS <= set(result)
    json.dumps(result)  # JSON-able
    devices = jax.device_count()
    assert result["num_devices"] == devices
    assert (result["step_ms_min"], result["step_ms_median"], result["step_ms_max"]) == pytest.approx((200, 250, 300))
    assert result["images_per_sec"] == pytest.approx(8 / 0.25)
    assert result["images_per_sec_per_device"] == pytest.approx(8 / 0.25 / devices)
    # MFU = model FLOPs per step / median step time / (peak per device x devices).
    assert result["tflops_per_sec"] == pytest.approx(result["flops_per_step"] / 0.25 / 1e12)
    assert result["mfu"] == pytest.approx(result["flops_per_step"] / 0.25 / (0.39e12 * devices))
    assert 100 * 2**20 < result["peak_host_rss_bytes"] < 64 * 2**30  # bytes (getrusage gives KiB on Linux)
    # This step's own peak (XLA's buffer assignment): at least the float32 parameters it reads.
    assert 4 * MICRO_PARAMS_10_CLASSES < result["compiled_peak_memory_bytes"] < 2**30
    # Model FLOPs: 2 x the multiply-adds of the traced step. An evaluation step is exactly the
    # network's forward pass; a train step about 3x it (no input gradient of the first layer);
    # with remat the recomputed forward is not model FLOPs.
    if mode == "eval":
        assert result["flops_per_step"] == result["analytic_flops_per_step"] == 2 * MICRO_MACS_AT_32 * 8
    else:
        assert result["flops_per_step"] == pytest.approx(result["analytic_flops_per_step"], rel=0.10)
        assert result["analytic_flops_per_step"] == 3 * 2 * MICRO_MACS_AT_32 * 8
    # What benchmarks/compare_pytorch.py checks a PyTorch twin against.
    assert result["macs_per_image"] == MICRO_MACS_AT_32
    assert result["params"] == MICRO_PARAMS_10_CLASSES


def test_cli_prints_exactly_one_json_object(capsys):
    assert bench.main(["--model", "micro", "--image-size", "32", "--batch-size", "8", "--steps", "1", "--warmup", "0",
                       "--mode", "eval", "--json", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert KEYS <= set(json.loads(out))
    assert out.count("\n") == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="does not divide"):
        bench.run_benchmark("micro", image_size=32, batch_size=6)
    with pytest.raises(ValueError, match="unknown mode"):
        bench.run_benchmark("micro", image_size=32, batch_size=8, mode="infer")
    with pytest.raises(ValueError, match="mock-examples"):
        bench.run_benchmark("micro", image_size=32, batch_size=8, mode="input", mock_examples=0)
    with pytest.raises(ValueError, match="does not apply to --mode input"):
        bench.run_benchmark("micro", image_size=32, batch_size=8, mode="input", profile_dir="/tmp/unused")


def test_input_pipeline_alone_over_mock_cifar10(capsys):
    assert bench.main(["--mode", "input", "--dataset", "cifar10", "--mock-examples", "300", "--batch-size", "64",
                       "--steps", "3", "--warmup", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert result["model"] is None and result["dataset"] == "cifar10" and result["image_size"] == 32
    assert result["images_per_sec"] > 0 and result["flops_per_step"] is None and result["mfu"] is None


def test_train_step_fed_by_the_pipeline():
    result = bench.run_benchmark("micro", image_size=32, batch_size=8, mode="train", steps=2, warmup=1,
                                 num_classes=10, input_kind="pipeline", dataset="digits")
    assert result["input"] == "pipeline" and result["dataset"] == "digits" and result["images_per_sec"] > 0


def test_input_pipeline_text_report(capsys):
    assert bench.main(["--mode", "input", "--dataset", "cifar10", "--mock-examples", "300", "--batch-size", "64",
                       "--steps", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cifar10 input pipeline alone: augmented 32x32 training batches of 64")
    assert any(line.startswith("throughput: ") for line in out) and not any("FLOPs" in line for line in out)
