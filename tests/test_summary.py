"""The model-summary command: per-part rows that add up to the traced totals, the table, the errors."""

import subprocess
import sys

import pytest
from conftest import zoo_counts

from resattn_jax.tools import summary

ATTENTION56_PARAMS = 31_810_728  # at 224x224 (README model zoo)
ATTENTION56_MACS = 6_270_836_736


@pytest.fixture(scope="module")
def attention56():
    return summary.summarize("attention56")


def check_rows_add_up(result: summary.Summary) -> None:
    """The rows add up to the totals, each stage's subtotal to its rows."""
    assert sum(row.params for row in result.rows) == result.params
    assert sum(row.macs for row in result.rows) == result.macs
    for s, stage in result.stages().items():
        parts = [row for row in result.rows if row.stage == s]
        assert (stage.params, stage.macs) == (sum(r.params for r in parts), sum(r.macs for r in parts))
        assert stage.output == parts[-1].output


def test_attention56_totals_are_the_traced_counts(attention56):
    counts = zoo_counts("attention56", 224)
    assert attention56.image_shape == (224, 224, 3)  # the ImageNet default
    assert attention56.params == counts["params"] == ATTENTION56_PARAMS
    assert attention56.macs == counts["macs"] == ATTENTION56_MACS
    check_rows_add_up(attention56)


def test_attention56_rows(attention56):
    rows = {row.name: row for row in attention56.rows}
    assert list(rows) == ["stem", "stage1_units", "stage1_attention0", "stage2_units", "stage2_attention0",
                          "stage3_units", "stage3_attention0", "final", "classifier"]
    assert rows["stem"].modules == ("stem_conv", "stem_bn")
    assert rows["stem"].output == (56, 56, 64)  # after the max pool
    assert rows["stem"].params == 7 * 7 * 3 * 64 + 2 * 64
    assert rows["final"].modules == ("final_unit0", "final_unit1", "final_unit2", "final_bn")
    assert rows["final"].output == (7, 7, 2048)  # before the global pool
    assert (rows["classifier"].output, rows["classifier"].params, rows["classifier"].macs) == \
        ((1000,), 2048 * 1000 + 1000, 2048 * 1000)
    for s, (size, width) in enumerate([(56, 256), (28, 512), (14, 1024)], start=1):
        assert rows[f"stage{s}_units"].modules == (f"stage{s}_unit",)
        attention = rows[f"stage{s}_attention0"]
        assert attention.stage == s and attention.output == attention.soft_mask == (size, size, width)
        assert rows[f"stage{s}_units"].soft_mask is None
    # The attention module is most of its stage.
    stages = attention56.stages()
    assert list(stages) == [1, 2, 3]
    assert all(rows[f"stage{s}_attention0"].macs > stages[s].macs / 2 for s in stages)


def test_cifar_network_rows():
    result = summary.summarize("cifar_attention92")
    counts = zoo_counts("cifar_attention92", 32)
    assert result.image_shape == (32, 32, 3)  # the CIFAR default
    assert (result.params, result.macs, result.num_classes) == (counts["params"], counts["macs"], 10)
    check_rows_add_up(result)
    masks = [(row.name, row.soft_mask) for row in result.rows if row.soft_mask]
    assert masks == [(f"stage{s}_attention{m}", (size, size, width))
                     for s, size, width in [(1, 32, 64), (2, 16, 128), (3, 8, 256)] for m in range(2)]


def test_remat_changes_no_row():
    # Rematerialised units trace as remat bodies whose name stacks start at the unit.
    plain, remat = summary.summarize("tiny"), summary.summarize("tiny", remat=True)
    assert remat.rows == plain.rows and (remat.params, remat.macs) == (plain.params, plain.macs)


def test_cli_prints_the_table(capsys):
    assert summary.main(["attention56"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attention56 on 224x224x3 images, 1,000 classes")
    total = next(line for line in lines if line.startswith("total"))
    assert total.split() == ["total", "31,810,728", "6,270,836,736"]
    attention = next(line for line in lines if line.strip().startswith("attention0"))
    assert attention.split()[1:] == ["56x56x256", "976,896", "1,496,047,616", "56x56,", "256"]
    assert any(line.startswith("stage3 ") for line in lines)


def test_module_command_and_options():
    done = subprocess.run([sys.executable, "-m", "resattn_jax.summary", "tiny", "--num-classes", "7",
                           "--image-size", "48"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tiny on 48x48x3 images, 7 classes")
    classifier = next(line for line in done.stdout.splitlines() if line.startswith("classifier"))
    assert classifier.split()[:2] == ["classifier", "7"]


@pytest.mark.parametrize("argv,message", [
    (["attention57"], "unknown model 'attention57'"),
    (["attention56", "--image-size", "16"], "too small"),
    (["attention56", "--image-size", "0"], "image size must be a positive integer"),
])
def test_errors_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        summary.main(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("python -m resattn_jax.summary: error: ") and message in captured.err
    assert captured.err.count("\n") == 1
