"""Train a Residual Attention Network (the CLI behind ``train.py`` and ``resattn-train``).

    python train.py --config configs/digits.py --workdir /tmp/digits
    python train.py --config configs/cifar.py:cifar100,attention92 --workdir runs/c100_a92 \
        --config.global_batch_size=128 --config.dtype=bfloat16

Rerunning with the same --workdir resumes from its latest checkpoint. Exit status: 0 done,
2 bad configuration or input, 3 non-finite loss/gradient, 143 preempted (checkpoint saved).
"""

import os
import sys

# TensorFlow is only tfds's input backend here: keep its start-up chatter off the console (its
# oneDNN option concerns TF's own matrix kernels, which the input pipeline does not use).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resattn_jax.ops import backend  # noqa: E402
from resattn_jax.training import loop as train_lib  # noqa: E402
from resattn_jax.training import parallel  # noqa: E402

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


def fail(message: str, status: int = 2):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(status)


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
        field = str(e).strip("\"'")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and field in a.split("=")[0]]
        fail(f"{overrides[0] if overrides else 'config'}: no such config field {field!r}")
    except Exception as e:  # noqa: BLE001 - e.g. a config file that fails to import or a bad argument
        fail(f"cannot load the config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # tfds/jax INFO chatter; progress goes to stderr
    try:
        backend.tune_host_memory()  # CPU runs only; before JAX starts its backend threads
        if FLAGS.distributed_auto or FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
            parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                            auto=FLAGS.distributed_auto)
        summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, train_lib.CheckpointError) as e:
        fail(str(e))
    except train_lib.NonFiniteError as e:
        fail(str(e), status=3)
    except train_lib.Preempted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return train_lib.PREEMPTED_EXIT_CODE
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
