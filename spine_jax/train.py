"""Entry point: python -m spine_jax.train --config=configs/bone_quality.py --workdir=DIR [--config.field=value].

The same command runs on one device, one host, or as one of many processes of a multi-host job:
`--distributed` (or SPINE_JAX_DISTRIBUTED=1, or any of --coordinator_address/--num_processes/
--process_id) joins the job with `jax.distributed.initialize` before any device is touched. On
SLURM, Cloud TPU VMs and Open MPI the coordinator, process count and index are detected; elsewhere
(Kubernetes, a plain shell) pass them. See launch/ for ready-made launchers.
"""
import os
import re
import sys
import traceback

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from spine_jax import cli
from spine_jax.config_variants import ConfigError
from spine_jax.conversion.errors import ConversionError
from spine_jax.data.manifest import ManifestError
from spine_jax.data.nifti import NiftiError
from spine_jax.engine.checkpoints import CheckpointError
from spine_jax.training import loop

# A user's mistake (config values, data, manifests, checkpoints, weights to start from, the work
# directory): one line, exit 1.
USER_ERRORS = (ConfigError, ManifestError, NiftiError, CheckpointError, ConversionError, OSError)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval.json.")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("workdir", lambda v: v is None or bool(v.strip()), "--workdir must name a folder")
_CACHE = cli.define_compilation_cache_flag()

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Join a multi-process job with jax.distributed.initialize. Default: on when "
    "SPINE_JAX_DISTRIBUTED=1 or any of --coordinator_address/--num_processes/--process_id is given.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator service (or env JAX_COORDINATOR_ADDRESS); "
    "detected on SLURM, Cloud TPU VMs and Open MPI.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job (detected where possible).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1 (detected where possible).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Accelerators this process drives, e.g. 0,1,2,3 (default: JAX's choice, one GPU per "
    "process under SLURM/Open MPI, all local devices otherwise).")
flags.register_validator("local_device_ids", lambda v: v is None or all(i.strip().isdigit() for i in v),
                         message="--local_device_ids takes device numbers separated by commas, e.g. 0,1,2,3")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to join before giving up.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without heartbeats after which a process counts as dead; every other process "
    "then stops with an error instead of waiting for it.")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout", 300, "Seconds a finishing process waits for the others at the final barrier.")
_STEP_TIMEOUT = flags.DEFINE_float(
    "step_timeout", 1800.0, "Multi-process runs: seconds without a finished training step (after the first, and "
    "outside checkpoints and evaluations) after which a process reports a hang and exits. 0: never.")


def parse_flags(argv):
  """absl parsing, with an unknown `--config.a.b=...` field reported by name instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    missing = str(e).strip("\"'")
    culprits = [a for a in argv[1:] if a.startswith("--config.") and
                re.search(rf"[.]{re.escape(missing)}(=|[.]|$)", a.split("=", 1)[0])]
    shown = culprits[0] if culprits else f"a --config.* override ({missing!r})"
    sys.exit(f"error: unknown config field in {shown}: the config has no field {missing!r}. "
             f"See the config file for the fields it defines.")
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:  # config_flags puts the config file's traceback in the text
      last = text.strip().splitlines()[-1]
      what = re.match(r"^[\w.]*?(\w+): (.*)$", last)
      if what and what.group(1) == ConfigError.__name__:
        sys.exit(f"error: {what.group(2)}")
      sys.exit(f"error: {text.splitlines()[0].rstrip(':')}: {last}")
    sys.exit(cli.flag_error(e))


def wants_distributed() -> bool:
  """The flag wins either way; otherwise explicit job coordinates or SPINE_JAX_DISTRIBUTED=1 (for launchers
  that can set the environment but not the command) turn it on."""
  if _DISTRIBUTED.value is not None:
    return _DISTRIBUTED.value
  if any(v is not None for v in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)):
    return True
  return os.environ.get("SPINE_JAX_DISTRIBUTED", "").strip().lower() in ("1", "true", "yes", "on")


def start_distributed() -> None:
  """jax.distributed.initialize, which must precede any use of a device; what is not given is auto-detected."""
  ids = [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None
  where = (f"coordinator {_COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS') or '(auto-detected)'}, "
           f"process {_PROCESS_ID.value if _PROCESS_ID.value is not None else '?'} of "
           f"{_NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else '?'}")
  try:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
        local_device_ids=ids, initialization_timeout=_INIT_TIMEOUT.value,
        heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value, shutdown_timeout_seconds=_SHUTDOWN_TIMEOUT.value)
  except Exception as e:  # noqa: BLE001 - whatever the cause, the user needs the parameters it ran with
    sys.exit(f"error: could not join the distributed run ({where}, initialization_timeout "
             f"{_INIT_TIMEOUT.value} s): {type(e).__name__}: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:  # a config file that failed to load raises on first use, listing the paths tried over several lines
    _CONFIG.value.get("task")
  except OSError as e:
    raise app.UsageError(f"--config: {str(e).strip().splitlines()[-1].strip()}") from None
  logging.set_verbosity(logging.WARNING)  # orbax, grain and jax.distributed are chatty at INFO
  if wants_distributed():
    start_distributed()
  cli.use_compilation_cache(_CACHE.value)
  if jax.process_index() > 0:  # progress and warnings from process 0 only; the others report errors
    logging.set_verbosity(logging.ERROR)
  try:
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, step_timeout=_STEP_TIMEOUT.value)
  except (Exception, KeyboardInterrupt) as e:  # SystemExit (preemption's 42) passes through
    if jax.process_count() == 1:
      if isinstance(e, USER_ERRORS):
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
      raise
    # Leave at once, skipping the shutdown barrier: the other processes then see this one gone and stop
    # (collective error or missed heartbeats) instead of waiting in a collective for it.
    traceback.print_exc()
    print(f"error: process {jax.process_index()}/{jax.process_count()} failed ({type(e).__name__}); exiting "
          f"without waiting for the other processes", file=sys.stderr, flush=True)
    os._exit(130 if isinstance(e, KeyboardInterrupt) else 1)


if __name__ == "__main__":
  cli.run(main, "spine_jax.train", flags_parser=parse_flags)
