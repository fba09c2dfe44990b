"""The flags with which a binary joins a multi-process run, shared by every binary (importing this module defines
them). Each defaults to its environment variable (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
JAX_INITIALIZATION_TIMEOUT); without either, a process runs alone, or joins its slice on Cloud TPU VMs
(qwen3vl_jax.parallel.multihost.initialize_distributed)."""

import json
import sys

from absl import flags
from ml_collections import ConfigDict

from qwen3vl_jax.parallel.multihost import check_same_settings, initialize_distributed

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of the run's coordinator (process 0 starts it there)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the run, 0 .. num_processes - 1.")
_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", None, "Seconds to wait for the coordinator and the other processes (default 300)."
)
OWN_FLAGS = ("--coordinator_address", "--num_processes", "--process_id", "--initialization_timeout")


def join_run(config: ConfigDict | None = None) -> None:
    """Joins this process to its multi-process run when the flags or the environment say it is one, and checks
    that every process was started with the same arguments and (resolved) `config`: ConfigMismatch on all of them
    otherwise, naming what differs."""
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, timeout_seconds=_TIMEOUT.value)
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith(OWN_FLAGS)]
    resolved = json.loads(config.to_json_best_effort()) if config is not None else None
    check_same_settings(dict(arguments=arguments, config=resolved), what="command line or config")
