"""Train a Residual Attention Network (the CLI behind ``train.py`` and ``resattn-train``).

    python train.py --config configs/digits.py --workdir /tmp/digits
    python train.py --config configs/cifar.py:cifar100,attention92 --workdir runs/c100_a92 \
        --config.global_batch_size=128 --config.dtype=bfloat16

Rerunning with the same --workdir resumes from its latest good checkpoint (one run per workdir;
a resume must use the same config but for its length and intervals). Exit status: 0 done,
2 bad configuration, input or workdir, 3 non-finite loss/gradient, 1 any other failure (one line;
the traceback goes to WORKDIR/error.log, or to the console with --verbose), 143 preempted
(checkpoint saved), 130 interrupted twice (Ctrl-C Ctrl-C: at once, nothing saved).
"""

import ast
import logging
import os
import re
import sys
import traceback

# TensorFlow's start-up lines are kept off the console by resattn_jax/tools/__init__.py.
import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resattn_jax.ops import backend  # noqa: E402
from resattn_jax.training import loop as train_lib  # noqa: E402
from resattn_jax.training import parallel  # noqa: E402
from resattn_jax.training.checkpoint import CheckpointWriteError  # noqa: E402
from resattn_jax.training.data.config import FOLDER  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:ARG]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process (multi-host) jobs: one train.py per host, see README "Multi-host training".
flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                    "host:port of process 0 (env JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ
                     else None, "Number of processes in the job (env JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
                     "This process's index in [0, num_processes) (env JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed_auto", False, "Join a multi-process job detected by JAX (Cloud TPU, SLURM).")
flags.DEFINE_bool("verbose", False, "Print full tracebacks: of a failure, and of the libraries' logged errors.")


def fail(message: str, status: int = 2, now: bool = False):
    """Print ``message`` as one line and exit with ``status``. ``now``: skip the interpreter's
    shutdown, where the threads of a failed asynchronous save print their tracebacks."""
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


class OneLineLogs(logging.Filter):
    """Library log records as one line each, without tracebacks, each distinct line once; of the
    error records (Orbax's failed background saves, asyncio's unretrieved task errors: hundreds of
    lines on a full disk) only the first. The failure itself is reported by :func:`main`."""

    def __init__(self):
        super().__init__()
        self._seen = set()
        self._errors = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().strip().splitlines()
        line = message[0][:300] if message else ""
        if record.exc_info and record.exc_info[1] is not None:
            line = f"{line} ({describe(record.exc_info[1])})" if line else describe(record.exc_info[1])
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = line, None, None, None, None
        if (record.levelno, line) in self._seen:
            return False
        self._seen.add((record.levelno, line))
        if record.levelno >= logging.ERROR:
            self._errors += 1
            return self._errors == 1
        return True


def _quiet_closed_loop_errors() -> None:
    """After a background save fails, Orbax closes its event loop while TensorStore still completes
    writes into it: each completion prints a 'RuntimeError: Event loop is closed' traceback (through
    ``sys.excepthook`` or ``sys.unraisablehook``). Drop those; the failure is reported once."""
    def closed_loop(error) -> bool:
        return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)

    default_excepthook, default_unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, error, tb: None if closed_loop(error) else default_excepthook(kind, error, tb)
    sys.unraisablehook = lambda info: None if closed_loop(info.exc_value) else default_unraisablehook(info)


def describe(error: BaseException) -> str:
    """One line for an exception: an OS error's cause and path, else its type and first line."""
    while not isinstance(error, OSError) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _save_traceback(error: BaseException) -> str:
    """Write the traceback to WORKDIR/error.log; returns a hint naming it ('' when it cannot be written)."""
    path = os.path.join(os.path.abspath(FLAGS.workdir), "error.log")
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        return ""
    return f" (traceback in {path}; --verbose prints it)"


def _config_package_on_path(argv) -> None:
    """Config files import their siblings (``from configs import default``): put the folder that holds
    the config's package on ``sys.path``, as ``python train.py`` from the repository root does, so
    that the ``resattn-train`` console script finds them from anywhere."""
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    values += [value for flag, value in zip(argv, argv[1:]) if flag == "--config"]
    for value in values:
        folder = os.path.dirname(os.path.abspath(value.split(":", 1)[0]))  # drop the ':ARG' suffix
        root = os.path.dirname(folder)
        if os.path.isfile(os.path.join(folder, "__init__.py")) and root not in sys.path:
            sys.path.append(root)

def parse_flags(argv):
    """absl flag parsing with one-line errors for bad config files and overrides."""
    _config_package_on_path(argv)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # an exception inside the config file
            lines = [lines[0].split(":")[0] + ":", lines[-1]]
        fail(" ".join(lines))
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no existing field
        # The message is "'field'" or "'field'\nDid you mean \"fields\" instead of \"field\"?".
        text = str(e.args[0]) if e.args else str(e)
        while text[:1] in ("'", '"'):  # the message arrives quoted (repr'd), possibly twice
            try:
                text = str(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                break
        field, _, hint = text.partition("\n")
        field = field.strip("\"' ")
        suggestion = re.match(r'Did you mean "([^"]+)"', hint.strip())
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and field in a.split("=")[0]]
        fail(f"{overrides[0] if overrides else 'config'}: no such config field {field!r}"
             + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""))
    except Exception as e:  # noqa: BLE001 - e.g. a config file that fails to import or a bad argument
        fail(f"cannot load the config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def explicit_fields(argv) -> set[str]:
    """The config fields set on the command line: ``{'data.name', 'optimizer.learning_rate', ...}``."""
    return {arg[len("--config."):].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")}


def apply_folder_preset(config, explicit: set[str]) -> None:
    """``--config.data.name=folder:PATH`` brings the folder's preset (by its images' size, see
    :func:`resattn_jax.training.data.data_preset`) for every data field not set on the command line."""
    if "data.name" not in explicit or not config.data.name.startswith(FOLDER):
        return
    from resattn_jax.training.data import folder

    fields = {k: v for k, v in folder.preset(config.data.name[len(FOLDER):]).items() if f"data.{k}" not in explicit}
    for key, value in fields.items():
        config.data[key] = value
    print(f"{config.data.name}: preset {', '.join(f'{k}={v!r}' for k, v in fields.items())}", file=sys.stderr)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # tfds/jax INFO chatter; progress goes to stderr
    if not FLAGS.verbose:
        one_line = OneLineLogs()
        for handler in logging.getLogger().handlers:
            handler.addFilter(one_line)
        _quiet_closed_loop_errors()
    try:
        backend.tune_host_memory()  # CPU runs only; before JAX starts its backend threads
        if FLAGS.distributed_auto or FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
            parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                            auto=FLAGS.distributed_auto)
        apply_folder_preset(FLAGS.config, explicit_fields(sys.argv))
        summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, train_lib.CheckpointError) as e:
        fail(str(e))
    except train_lib.NonFiniteError as e:
        fail(str(e), status=3)
    except CheckpointWriteError as e:
        fail(str(e) + _save_traceback(e), status=1, now=True)
    except train_lib.Preempted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return train_lib.PREEMPTED_EXIT_CODE
    except Exception as e:  # noqa: BLE001 - disk full, unreadable files, a bug: one line, traceback kept
        if FLAGS.verbose:
            raise
        fail(describe(e) + _save_traceback(e), status=1, now=True)
    if jax.process_index() != 0:  # process 0 reports for a multi-process job
        return 0
    print(f"test accuracy {summary['test_accuracy']:.4f} (top-5 {summary['test_top5']:.4f}) with "
          f"{summary['best_checkpoint']}; summary in {FLAGS.workdir}/summary.json")
    return 0


def run() -> None:
    """Entry point of ``train.py`` and the ``resattn-train`` console script."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
