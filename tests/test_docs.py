"""The README says only what the code does: its model-zoo figures, its config recipes and the paths it names.

Everything is read off the code without compiling: parameter and statistics counts from
``jax.eval_shape`` of ``init``, multiply-adds from the traced jaxpr (:func:`model_macs`), recipes
from the config files themselves.
"""

import functools
import importlib
import importlib.util
import itertools
import os
import re

import pytest
from conftest import zoo_counts as counts

import resattn_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


@functools.lru_cache(maxsize=None)
def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def prose() -> str:
    """The README without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", readme(), flags=re.S | re.M)


def tables() -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table: (header cells, rows of cells)."""
    found, block = [], []
    for line in prose().splitlines() + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
            found.append((block[0], block[2:]))
        block = []
    return found


def table(*header_start: str) -> list[dict[str, str]]:
    """The rows, as {header: cell}, of the one table whose header begins with ``header_start``."""
    matches = [(header, rows) for header, rows in tables() if tuple(header[:len(header_start)]) == header_start]
    assert len(matches) == 1, f"README: expected one table headed {header_start}, found {len(matches)}"
    header, rows = matches[0]
    for row in rows:
        assert len(row) == len(header), f"README table {header_start}: row {row} has {len(row)} cells"
    return [dict(zip(header, row)) for row in rows]


def code(cell: str) -> str:
    """The text of the single code span in a table cell."""
    spans = re.findall(r"`([^`]+)`", cell)
    assert len(spans) == 1, f"README: expected one `code` span in {cell!r}"
    return spans[0]


def integer(text: str) -> int:
    """``**31,810,728**`` -> 31810728."""
    digits = text.strip().strip("*").replace(",", "")
    assert re.fullmatch(r"\d+", digits), f"README: {text!r} is not an exact integer"
    return int(digits)


# --------------------------------------------------------------------------- model zoo


def zoo_rows() -> list[dict[str, str]]:
    return table("name", "input", "params", "multiply-adds")


def test_every_zoo_network_is_in_the_table():
    named = [code(row["name"]) for row in zoo_rows()]
    assert len(named) == len(set(named)), f"README zoo table names a network twice: {named}"
    assert sorted(named) == resattn_jax.list_models()


@pytest.mark.parametrize("row", zoo_rows(), ids=lambda row: code(row["name"]))
def test_zoo_table_figures_are_the_models(row):
    name = code(row["name"])
    assert name in resattn_jax.list_models(), f"README zoo table: no network {name!r}"
    size = int(re.match(r"\d+", row["input"]).group())
    actual = counts(name, size)
    assert integer(row["params"]) == actual["params"], f"{name}: README params {row['params']}, model {actual['params']:,}"
    assert integer(row["multiply-adds"]) == actual["macs"], \
        f"{name}: README multiply-adds {row['multiply-adds']} at {size}x{size}, model {actual['macs']:,}"
    # Bold marks exactly the figures equal to the official release's.
    official = {integer(n) for n in re.findall(r"\d[\d,]{4,}", row["official release / paper"])}
    for column in ("params", "multiply-adds"):
        bold = row[column].startswith("**")
        assert bold == (integer(row[column]) in official), f"{name}: {column} bold={bold}, official {official or 'none'}"


def test_batch_stats_sentence():
    sentence = re.search(r"BatchNorm running statistics \(`batch_stats`\):(.*?)\.", prose(), flags=re.S)
    assert sentence, "README: no 'BatchNorm running statistics (`batch_stats`): ...' sentence"
    figures = re.findall(r"([\d,]+) for Attention-(\d+)", sentence.group(1))
    assert figures, f"README: no figures in {sentence.group(0)!r}"
    for figure, depth in figures:
        actual = counts(f"attention{depth}", 224)["batch_stats"]
        assert integer(figure) == actual, f"README: Attention-{depth} batch_stats {figure}, model {actual:,}"


# --------------------------------------------------------------------------- config recipes


def load_config(spec: str):
    """``configs/cifar.py:cifar10,attention92`` -> that config (as ``train.py`` would load it)."""
    path, _, arg = spec.partition(":")
    assert re.fullmatch(r"configs/\w+\.py", path), f"README: {spec!r} is not configs/NAME.py[:ARG]"
    assert os.path.isfile(os.path.join(ROOT, path)), f"README names {path}, which does not exist"
    module = importlib.import_module("configs." + os.path.basename(path)[:-3])
    return module.get_config(arg) if arg else module.get_config()


def numbers(text: str) -> tuple[float, ...]:
    """``64,000; 96,000`` -> (64000.0, 96000.0); ``1e-4`` -> (0.0001,)."""
    return tuple(float(part.strip().replace(",", "")) for part in text.split(";") if part.strip())


def resolved(config) -> dict[str, object]:
    """The recipe table's columns, from a config."""
    opt = config.optimizer
    lr = float(opt.learning_rate) * (config.global_batch_size / opt.base_batch_size if opt.base_batch_size else 1)
    return {
        "global batch": (float(config.global_batch_size),), "learning rate": (lr,),
        "momentum": (float(opt.momentum),), "Nesterov": "yes" if opt.nesterov else "no",
        "weight decay": (float(opt.weight_decay),),
        "lr x 0.1 at step": tuple(float(b) for b in sorted(opt.boundaries)) if float(opt.decay_factor) == 0.1
        else f"decay factor {opt.decay_factor}, not 0.1",
        "train steps": (float(config.num_train_steps),), "warm-up steps": (float(opt.warmup_steps),),
    }


def recipe_rows() -> list[dict[str, str]]:
    return table("config", "global batch")


@pytest.mark.parametrize("row", recipe_rows(), ids=lambda row: code(row["config"]))
def test_recipe_table_is_the_resolved_config(row):
    spec = code(row["config"])
    expected = resolved(load_config(spec))
    assert set(row) - {"config"} == set(expected), f"README recipe table columns {sorted(row)}"
    for column, value in expected.items():
        cell = row[column] if isinstance(value, str) else numbers(row[column])
        assert cell == value, f"{spec}: README {column} = {row[column]!r}, config resolves to {value}"


def experiment_configs() -> list[str]:
    rows = table("experiment (paper)", "command")
    return [re.search(r"--config (configs/\S+?)(?:`|\s)", row["command"]).group(1) for row in rows]


def test_recipe_table_covers_the_experiments_table():
    assert sorted(code(row["config"]) for row in recipe_rows()) == sorted(experiment_configs())


# Every argument each config file accepts (its docstring's list).
CONFIG_ARGS = {
    "cifar": [",".join(a) for a in itertools.product(("cifar10", "cifar100"), (
        "attention56", "attention92", "attention128", "attention164", "attention236", "attention452"))],
    "attention_type": ["mixed", "channel", "spatial"],
    "arl_vs_nal": [",".join(a) for a in itertools.product(("arl", "nal"), (
        "attention56", "attention92", "attention128", "attention164"))],
    "label_noise": [",".join(a) for a in itertools.product(("attention92", "resnet164"), ("0.1", "0.3", "0.5", "0.7"))],
    "imagenet": ["attention56", "attention92", "attentionnext56", "attentioninception56"],
}


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_a_config_files_arguments_share_one_recipe(name):
    # The README: "the other arguments of a file change only the network, data or label noise".
    recipes = {arg: resolved(load_config(f"configs/{name}.py:{arg}")) for arg in CONFIG_ARGS[name]}
    first = next(iter(recipes.values()))
    for arg, recipe in recipes.items():
        assert recipe == first, f"configs/{name}.py:{arg} resolves to another recipe than the other arguments"


def test_every_config_the_readme_names_loads():
    specs = {spec.rstrip(".,") for spec in re.findall(r"--config[ =\\\n]+(configs/[\w.]+(?::[\w.,]+)?)", readme())}
    assert specs
    for spec in sorted(specs):
        load_config(spec)


# --------------------------------------------------------------------------- paths and modules

#: First components of paths a run or an export writes (not repository files).
OUTPUTS = {"runs", "checkpoints", "tensorboard", "saved_model"}
FILE_SUFFIXES = (".py", ".md", ".txt", ".toml", ".cc", ".h", ".cfg", ".yaml", ".yml", ".sh")
PATHLIKE = re.compile(r"(\.\./)*\.?[a-z_][\w.-]*(/[\w.{},-]*)*")  # ../ only to be refused


def expand_braces(path: str) -> list[str]:
    """``a/{b,c}.py`` -> ``['a/b.py', 'a/c.py']``."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for option in match.group(1).split(",")
            for p in expand_braces(path[:match.start()] + option + path[match.end():])]


def path_words(span: str) -> list[str]:
    """The words of a code span that name repository files or folders."""
    words = []
    for word in span.split():
        word = word.strip("()[];,'\"")
        if word.startswith("--"):
            word = word.partition("=")[2]
        word = word.partition(":")[0]  # configs/x.py:ARG
        if not word or "..." in word or not PATHLIKE.fullmatch(word):
            continue
        if ("/" not in word and not word.endswith(FILE_SUFFIXES)) or word.split("/")[0] in OUTPUTS:
            continue
        words.append(word)
    return words


def named_paths() -> list[tuple[str, str | None, str]]:
    """(path, folder it is relative to or None, where) for every path in an inline code span.

    In a table row whose first cell is a folder (the layout tables), bare file names are relative to
    that folder; anywhere else paths are relative to the repository (or to the package)."""
    lines = prose().splitlines()
    rows = [line for line in lines if line.startswith("|")]
    text = "\n".join(line for line in lines if not line.startswith("|"))  # code spans may wrap
    found = []
    for row in rows + [text]:
        base = None
        if row.startswith("|"):
            first = re.findall(r"`([^`]+)`", row.strip("|").split("|")[0])
            base = first[0] if first and first[0].endswith("/") else None
        for span in re.findall(r"`([^`]+)`", row):
            for word in path_words(span):
                for path in expand_braces(word):
                    found.append((path, base, f"`{' '.join(span.split())}`"))
    return found


def resolve(path: str, base: str | None) -> str | None:
    """The repository path that ``path`` names, or None (also for a path out of the repository)."""
    if path.startswith("../"):
        return None
    if base and "/" not in path:
        candidates = [os.path.join(base, path)]
    else:  # relative to the repository, or to the package (ops/cpu/winograd.py)
        candidates = [path, os.path.join("resattn_jax", path)]
    for candidate in candidates:
        if os.path.exists(os.path.join(ROOT, candidate)):
            return candidate
    return None


def test_readme_names_paths():
    paths = named_paths()
    assert len(paths) > 50, f"README path parser found only {len(paths)} paths"
    for required in ("resattn_jax/ops/backend.py", "configs/digits.py", "docs/benchmarks.md",
                     "benchmarks/compare_pytorch.py", "resattn_jax/models/zoo.py"):
        assert required in {p for p, _, _ in paths}, f"README path parser missed {required}"


def test_every_path_the_readme_names_exists():
    missing = [f"{os.path.join(base, path) if base else path} (README: {where})"
               for path, base, where in named_paths() if resolve(path, base) is None]
    assert not missing, "README names paths that are not in the repository:\n" + "\n".join(missing)


def test_every_module_the_readme_runs_exists():
    modules = set(re.findall(r"python -m (resattn_jax[\w.]*)", readme()))
    assert modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"README runs modules that do not exist: {missing}"
