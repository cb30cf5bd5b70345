"""Whether and how this process joins a multi-process JAX job, decided from its environment.

`jax.distributed.initialize()` must run before any JAX computation on every process of a
multi-host job, and must not run in a plain one-process run. The decision (`plan`) is a pure
function of the environment and the `main` flags, so each launcher's case is testable:

- explicit: a coordinator address (`--coordinator_address` or `JAX_COORDINATOR_ADDRESS`) with
  the process count and id (`--num_processes`/`--process_id` or `JAX_NUM_PROCESSES`/
  `JAX_PROCESS_ID`);
- SLURM: inside an `srun` step of several tasks (JAX's SlurmCluster reads SLURM_JOB_ID,
  SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID);
- Open MPI: `mpirun` of several ranks (JAX's OmpiCluster);
- Cloud TPU on GKE: several TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES.
- Cloud TPU VMs (`gcloud ... tpu-vm ssh --worker=all`, as `launch/tpu_pod.sh` runs) set no
  variable: JAX's GceTpuCluster reads the worker number and the workers' addresses from the
  VM's metadata server. `--distributed=on` (what tpu_pod.sh passes) hands detection to JAX.
"""

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import jax

logger = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
_SLURM_STEP_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The decision: `kwargs` for `jax.distributed.initialize`, or None for one process."""

    kwargs: dict | None
    reason: str


def _int(environ: Mapping[str, str], name: str, default: int = 0) -> int:
    value = environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer.") from None


def _several(environ: Mapping[str, str], name: str) -> bool:
    """Whether a comma-separated list variable names more than one host."""
    return len([part for part in environ.get(name, "").split(",") if part.strip()]) > 1


def _tasks_per_node(environ: Mapping[str, str]) -> int:
    """Tasks on this node ("2(x3)" and "2,1" forms included); 0 when SLURM does not say."""
    text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    node = _int(environ, "SLURM_NODEID", 0)
    counts: list[int] = []
    for part in filter(None, text.split(",")):
        count, _, repeat = part.partition("(x")
        counts.extend([int(count)] * (int(repeat.rstrip(")")) if repeat else 1))
    return counts[node] if node < len(counts) else 0


def _slurm_local_devices(environ: Mapping[str, str]) -> list[int] | None:
    """All of the node's GPUs for one task per node; None keeps JAX's one GPU per task.

    JAX's SlurmCluster gives each task the GPU numbered by its SLURM_LOCALID, right for one
    task per GPU but wrong for one task driving every GPU of its node.
    """
    if "JAX_LOCAL_DEVICE_IDS" in environ or _tasks_per_node(environ) != 1:
        return None
    gpus = _int(environ, "SLURM_GPUS_ON_NODE", 0)
    if not gpus and environ.get("CUDA_VISIBLE_DEVICES"):
        gpus = len(environ["CUDA_VISIBLE_DEVICES"].split(","))
    return list(range(gpus)) if gpus > 1 else None


def _explicit(
    environ: Mapping[str, str],
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> dict | None:
    address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return None
    if num_processes is None and "JAX_NUM_PROCESSES" in environ:
        num_processes = _int(environ, "JAX_NUM_PROCESSES")
    if process_id is None and "JAX_PROCESS_ID" in environ:
        process_id = _int(environ, "JAX_PROCESS_ID")
    if num_processes is None or process_id is None:
        raise ValueError(
            f"a coordinator address ({address}) is given but not the process count and this "
            "process's id: pass --num_processes and --process_id (or set JAX_NUM_PROCESSES "
            "and JAX_PROCESS_ID), or launch under SLURM/Open MPI, which provide them."
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in [0, {num_processes}).")
    return {
        "coordinator_address": address,
        "num_processes": num_processes,
        "process_id": process_id,
    }


def plan(
    environ: Mapping[str, str],
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Plan:
    """Decides whether to call `jax.distributed.initialize`, and with which arguments.

    `mode` "off" never initialises, "on" always does (JAX detects what is not given), and
    "auto" does when the environment shows a job of several processes.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}; use one of {MODES}.")
    if mode == "off":
        return Plan(None, "--distributed=off")
    explicit = _explicit(environ, coordinator_address, num_processes, process_id)
    if explicit is not None:
        return Plan(explicit, f"coordinator {explicit['coordinator_address']}")
    if all(name in environ for name in _SLURM_STEP_VARIABLES) and _int(environ, "SLURM_NTASKS") > 1:
        devices = _slurm_local_devices(environ)
        kwargs = {} if devices is None else {"local_device_ids": devices}
        return Plan(kwargs, f"SLURM step of {environ['SLURM_NTASKS']} tasks")
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return Plan({}, f"Open MPI job of {environ['OMPI_COMM_WORLD_SIZE']} ranks")
    if _several(environ, "TPU_WORKER_HOSTNAMES") or _several(environ, "TPU_PROCESS_ADDRESSES"):
        return Plan({}, "Cloud TPU slice of several hosts (GKE)")
    if mode == "on":
        return Plan({}, "--distributed=on (JAX detects the cluster)")
    if _int(environ, "SLURM_NTASKS", 1) > 1:
        logger.warning(
            "SLURM_NTASKS=%s but this is not an srun step (SLURM_STEP_NODELIST unset): running "
            "as one process. Start the trainer with srun to use every task.",
            environ["SLURM_NTASKS"],
        )
    return Plan(None, "no multi-process environment found")


def initialize(
    environ: Mapping[str, str],
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> Plan:
    """Runs `jax.distributed.initialize` when `plan` says so; returns the plan followed."""
    decision = plan(environ, mode, coordinator_address, num_processes, process_id)
    if decision.kwargs is not None:
        logger.info("Joining a multi-process JAX job: %s.", decision.reason)
        jax.distributed.initialize(**decision.kwargs, initialization_timeout=timeout_s)
    return decision


def describe(devices: Sequence[jax.Device] | None = None) -> str:
    """One line naming this process, the process count and the device counts."""
    devices = devices if devices is not None else jax.devices()
    return (
        f"JAX process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {len(devices)} devices ({jax.default_backend()})"
    )
