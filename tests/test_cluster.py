"""`main` joins a multi-process job exactly where a launcher started one (maskgit_jax.cluster)."""

import logging

import pytest

from maskgit_jax import cluster

# srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8: the variables of task 1.
SLURM_ONE_TASK_PER_NODE = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_GPUS_ON_NODE": "8",
}
# srun --nodes=2 --ntasks-per-node=4 --gpus-per-task=1: task 6 (node 1, local 2).
SLURM_ONE_TASK_PER_GPU = {
    "SLURM_JOB_ID": "4243",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "6",
    "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_GPUS_ON_NODE": "4",
}


def test_a_plain_run_stays_one_process():
    assert cluster.plan({"HOME": "/root"}).kwargs is None


def test_explicit_coordinator_from_environment():
    environ = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    assert cluster.plan(environ).kwargs == {
        "coordinator_address": "10.0.0.2:1234",
        "num_processes": 4,
        "process_id": 3,
    }


def test_explicit_coordinator_from_flags_wins_over_environment():
    environ = {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    decision = cluster.plan(environ, "auto", "b:2", num_processes=2, process_id=0)
    assert decision.kwargs == {"coordinator_address": "b:2", "num_processes": 2, "process_id": 0}


def test_coordinator_without_process_count_is_a_clear_error():
    with pytest.raises(ValueError, match="--num_processes and --process_id"):
        cluster.plan({"JAX_COORDINATOR_ADDRESS": "a:1"})
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        cluster.plan({}, "auto", "a:1", num_processes=2, process_id=2)


def test_slurm_one_task_per_node_gets_all_of_its_gpus():
    decision = cluster.plan(SLURM_ONE_TASK_PER_NODE)
    # JAX's SlurmCluster fills the coordinator, count and id; the trainer adds the GPUs.
    assert decision.kwargs == {"local_device_ids": list(range(8))}
    assert "SLURM" in decision.reason


def test_slurm_one_task_per_gpu_keeps_jax_default():
    assert cluster.plan(SLURM_ONE_TASK_PER_GPU).kwargs == {}


def test_slurm_local_device_ids_variable_is_respected():
    environ = {**SLURM_ONE_TASK_PER_NODE, "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}
    assert cluster.plan(environ).kwargs == {}


def test_slurm_single_task_stays_one_process():
    environ = {**SLURM_ONE_TASK_PER_NODE, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert cluster.plan(environ).kwargs is None


def test_sbatch_shell_outside_srun_stays_one_process_with_a_warning(caplog):
    environ = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    with caplog.at_level(logging.WARNING, logger=cluster.__name__):
        assert cluster.plan(environ).kwargs is None
    assert "srun" in caplog.text


def test_open_mpi_job():
    environ = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"}
    assert cluster.plan({**environ, "OMPI_COMM_WORLD_SIZE": "4"}).kwargs == {}
    assert cluster.plan({**environ, "OMPI_COMM_WORLD_SIZE": "1"}).kwargs is None


def test_gke_tpu_slice_of_several_hosts():
    assert cluster.plan({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}).kwargs == {}
    assert cluster.plan({"TPU_WORKER_HOSTNAMES": "w-0"}).kwargs is None


def test_cloud_tpu_vm_pod_needs_distributed_on():
    # A TPU VM of a pod sets no variable: JAX's GceTpuCluster asks the metadata server.
    assert cluster.plan({}, "auto").kwargs is None
    decision = cluster.plan({}, "on")
    assert decision.kwargs == {} and "JAX detects" in decision.reason


def test_off_wins_over_any_environment():
    assert cluster.plan(SLURM_ONE_TASK_PER_NODE, "off").kwargs is None
    with pytest.raises(ValueError, match="--distributed='sometimes'"):
        cluster.plan({}, "sometimes")


def test_bad_integer_variable_names_itself():
    with pytest.raises(ValueError, match="SLURM_NTASKS='two'"):
        cluster.plan({**SLURM_ONE_TASK_PER_NODE, "SLURM_NTASKS": "two"})
