#!/usr/bin/env bash
# Creates a Cloud TPU pod slice, installs maskgit_jax on every worker and runs the trainer.
# Run with -h for the usage. DRY_RUN=1 prints every gcloud command instead of running it.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

# Settings: the environment gives the defaults, flags override them.
TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
CAPACITY="${CAPACITY:-}"                 # "", spot or preemptible
CONFIG="${CONFIG:-configs/imagenet256.py}"
WORKDIR="${WORKDIR:-}"
REPO="${REPO:-${REPO_ROOT}}"             # git URL, or a local directory to copy
REPO_REF="${REPO_REF:-}"                 # branch, tag or commit of a git REPO
EXTRA_ARGS="${EXTRA_ARGS:-}"             # appended to the trainer's command line
JAX_SPEC="${JAX_SPEC:-}"                 # e.g. ">=0.10.2,<0.11"; default: read from setup.py
WORKER="${WORKER:-}"                     # worker(s) for `logs` (default 0); others use all
LOG_LINES="${LOG_LINES:-50}"
STOP_TIMEOUT="${STOP_TIMEOUT:-600}"      # seconds `stop` waits for the checkpoint
DRY_RUN="${DRY_RUN:-0}"
# Paths on the workers, relative to the remote home directory.
REMOTE_DIR="${REMOTE_DIR:-maskgit_jax}"
REMOTE_VENV="${REMOTE_VENV:-maskgit_venv}"
REMOTE_LOGS="${REMOTE_LOGS:-maskgit_logs}"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] COMMAND [-- TRAINER_ARGS...]

Commands:
  create    create the TPU VM slice (gcloud compute tpus tpu-vm create)
  install   on all workers: copy or clone the code, make a venv, pip install the
            jax[tpu] version pinned in setup.py, then the package
  train     start `python -m maskgit_jax.main` on all workers at once (nohup; one
            log per worker in ~/maskgit_logs); resumes from the latest checkpoint
  logs      print the end of the training logs (worker 0 unless --worker is given)
  stop      send SIGTERM to the trainer on all workers (it saves a checkpoint) and
            wait up to STOP_TIMEOUT seconds for it to exit
  delete    delete the TPU VM slice

Options (each also read from the environment variable of the same name):
  --tpu-name NAME           TPU_NAME          name of the slice (required)
  --zone ZONE               ZONE              e.g. us-west4-a (required)
  --project PROJECT         PROJECT           default: gcloud's configured project
  --accelerator-type TYPE   ACCELERATOR_TYPE  e.g. v5litepod-256, v4-64 (create)
  --runtime-version VER     RUNTIME_VERSION   e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base;
                                              default chosen from the accelerator type
  --spot | --preemptible    CAPACITY=spot|preemptible   create a Spot/preemptible slice
  --config PATH             CONFIG            default configs/imagenet256.py
  --workdir gs://...        WORKDIR           checkpoints and logs (must be gs://)
  --repo URL_OR_DIR         REPO              git URL, or local directory copied with
                                              scp (default: this checkout)
  --ref REF                 REPO_REF          branch/tag/commit when REPO is a git URL
  --extra-args "ARGS"       EXTRA_ARGS        extra trainer flags, e.g.
                                              "--config.training.batch_size=256"
  --worker W                WORKER            worker(s) for logs: 0, 3, all
  -h, --help                show this help

Anything after `--` is appended to the trainer flags as well.
Other environment variables: DRY_RUN=1 (print gcloud commands, run nothing),
JAX_SPEC, LOG_LINES, STOP_TIMEOUT, REMOTE_DIR, REMOTE_VENV, REMOTE_LOGS.

Example (v5e-256):
  export TPU_NAME=maskgit-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-256
  export WORKDIR=gs://my-bucket/maskgit/imagenet256
  launch/tpu_pod.sh --spot create && launch/tpu_pod.sh install
  launch/tpu_pod.sh train -- --config.dataset.data_dir=gs://my-bucket/tensorflow_datasets
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 1
}

# Prints a command as bash would re-read it: plain words bare, others single-quoted.
print_cmd() {
  local out="+" arg
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=" ${arg}"
    else
      out+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "${out}"
}

# Runs a command, or only prints it when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    print_cmd "$@"
  else
    "$@"
  fi
}

# --- Argument parsing -------------------------------------------------------------------
COMMAND=""
TRAINER_ARGS=()

set_option() {  # set_option --flag value
  case "$1" in
    --tpu-name) TPU_NAME="$2" ;;
    --zone) ZONE="$2" ;;
    --project) PROJECT="$2" ;;
    --accelerator-type) ACCELERATOR_TYPE="$2" ;;
    --runtime-version) RUNTIME_VERSION="$2" ;;
    --config) CONFIG="$2" ;;
    --workdir) WORKDIR="$2" ;;
    --repo) REPO="$2" ;;
    --ref) REPO_REF="$2" ;;
    --extra-args) EXTRA_ARGS="$2" ;;
    --worker) WORKER="$2" ;;
    *) die "unknown option $1 (see -h)" ;;
  esac
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --spot) CAPACITY=spot; shift ;;
    --preemptible) CAPACITY=preemptible; shift ;;
    --) shift; TRAINER_ARGS+=("$@"); break ;;
    --*=*) set_option "${1%%=*}" "${1#*=}"; shift ;;
    --*)
      [[ $# -ge 2 ]] || die "option $1 needs a value"
      set_option "$1" "$2"; shift 2 ;;
    -*) die "unknown option $1 (see -h)" ;;
    *)
      [[ -z "${COMMAND}" ]] || die "more than one command given: ${COMMAND} and $1"
      COMMAND="$1"; shift ;;
  esac
done

[[ -n "${COMMAND}" ]] || { usage >&2; exit 2; }

# --- Checks shared by the commands ------------------------------------------------------
require() {  # require VAR_NAME description
  [[ -n "${!1}" ]] || die "$1 is not set ($2); export it or pass the flag (see -h)"
}

check_workdir() {
  require WORKDIR "a gs:// path for checkpoints, e.g. gs://my-bucket/maskgit/run1"
  if [[ "${WORKDIR}" != gs://* ]]; then
    die "WORKDIR must be a gs:// path, got '${WORKDIR}'. Every worker of the pod runs the" \
      "trainer with the same --workdir, so a local directory would be a different, unshared" \
      "directory on each worker (checkpoints would be split or missing and resuming would fail)."
  fi
}

case "${CAPACITY}" in
  "" | spot | preemptible) ;;
  *) die "CAPACITY must be empty, spot or preemptible, got '${CAPACITY}'" ;;
esac
case "${REMOTE_DIR}/${REMOTE_VENV}/${REMOTE_LOGS}" in
  /* | */ | *//* | *..*)
    die "REMOTE_DIR, REMOTE_VENV and REMOTE_LOGS must be non-empty paths relative to" \
      "the remote home directory" ;;
esac
[[ "${LOG_LINES}" =~ ^[0-9]+$ ]] || die "LOG_LINES must be a number, got '${LOG_LINES}'"
[[ "${STOP_TIMEOUT}" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a number, got '${STOP_TIMEOUT}'"
# `train` requires WORKDIR; `create` and `install` check one that is set, to fail early.
if [[ -n "${WORKDIR}" && "${COMMAND}" =~ ^(create|install)$ ]]; then check_workdir; fi

require TPU_NAME "the TPU slice name"
require ZONE "the TPU zone, e.g. us-west4-a"

if [[ "${DRY_RUN}" != "1" ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found; install the Google Cloud SDK (or use DRY_RUN=1 to print the commands)"
fi

GCLOUD_LOCATION=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then GCLOUD_LOCATION+=(--project="${PROJECT}"); fi

# Runs a script on the given workers (the same script on each), in the login shell that
# gcloud creates for the user on TPU VMs: bash.
on_workers() {  # on_workers WORKERS SCRIPT
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_LOCATION[@]}" \
    --worker="$1" --command="$2"
}

# Prints the first lines of a remote script: the remote paths ($HOME is expanded on the
# worker), then NAME=VALUE for each argument, with VALUE quoted for the remote shell.
remote_vars() {
  # shellcheck disable=SC2016  # $HOME is meant for the worker
  printf 'R="$HOME"/%q; V="$HOME"/%q; L="$HOME"/%q\n' \
    "${REMOTE_DIR}" "${REMOTE_VENV}" "${REMOTE_LOGS}"
  local pair
  for pair in "$@"; do printf '%s=%q\n' "${pair%%=*}" "${pair#*=}"; done
}

# --- Commands ---------------------------------------------------------------------------
cmd_create() {
  require ACCELERATOR_TYPE "e.g. v5litepod-256 or v4-64"
  if [[ -z "${RUNTIME_VERSION}" ]]; then
    case "${ACCELERATOR_TYPE}" in
      v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) die "no default RUNTIME_VERSION for ${ACCELERATOR_TYPE}; set RUNTIME_VERSION" ;;
    esac
  fi
  local args=(gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_LOCATION[@]}"
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
  if [[ -n "${CAPACITY}" ]]; then args+=("--${CAPACITY}"); fi
  run "${args[@]}"
}

jax_spec() {
  if [[ -n "${JAX_SPEC}" ]]; then
    printf '%s\n' "${JAX_SPEC}"
    return
  fi
  local setup="${REPO_ROOT}/setup.py" spec
  if [[ -d "${REPO}" ]]; then setup="${REPO}/setup.py"; fi
  [[ -f "${setup}" ]] || die "cannot read ${setup} for the jax pin; set JAX_SPEC"
  spec="$(sed -n 's/^[[:space:]]*"jax\([<>=!~][^"]*\)".*/\1/p' "${setup}" | head -n 1)"
  [[ -n "${spec}" ]] || die "no \"jax...\" requirement in ${setup}; set JAX_SPEC"
  printf '%s\n' "${spec}"
}

cmd_install() {
  if [[ ! -d "${REPO}" && "${REPO}" =~ ^(/|\.|~) ]]; then
    die "REPO=${REPO} looks like a local path but is not a directory"
  fi
  local spec source_kind=git
  spec="$(jax_spec)"
  if [[ -d "${REPO}" ]]; then
    # A local checkout: pack it (without .git and build outputs), copy it to every worker.
    source_kind=tarball
    local tarball
    tarball="$(mktemp "${TMPDIR:-/tmp}/maskgit_src.XXXXXX")"
    # shellcheck disable=SC2064  # expand the path now
    trap "rm -f '${tarball}'" EXIT
    run tar -C "${REPO}" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.venv --exclude=venv -czf "${tarball}" .
    run gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:maskgit_src.tar.gz" \
      "${GCLOUD_LOCATION[@]}" --worker=all
  fi
  local script
  script="$(remote_vars SOURCE="${source_kind}" REPO="${REPO}" REF="${REPO_REF:-HEAD}" \
    JAX_REQ="jax[tpu]${spec}")
$(cat <<'EOF'
set -euo pipefail
if [ "$SOURCE" = tarball ]; then
  rm -rf "$R" && mkdir -p "$R"
  tar -xzf "$HOME/maskgit_src.tar.gz" -C "$R" && rm -f "$HOME/maskgit_src.tar.gz"
else
  # Clone once; then check out REF's current commit (detached) on every install.
  [ -d "$R/.git" ] || git clone --quiet "$REPO" "$R"
  git -C "$R" fetch --quiet origin "$REF"
  git -C "$R" checkout --quiet --detach FETCH_HEAD
fi
apt_install() {
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
# Recent jax releases need a newer Python than Ubuntu 22.04's 3.10.
PY=python3
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  PY=python3.11
  command -v python3.11 >/dev/null || apt_install python3.11 python3.11-venv
fi
if [ ! -x "$V/bin/python" ]; then
  "$PY" -m venv "$V" || { apt_install "$PY-venv" && rm -rf "$V" && "$PY" -m venv "$V"; }
fi
"$V/bin/python" -m pip install --quiet --upgrade pip
"$V/bin/python" -m pip install --quiet "$JAX_REQ"
"$V/bin/python" -m pip install --quiet -e "$R"
version="$("$V/bin/python" -c 'import jax; print(jax.__version__)')"
echo "$(hostname): jax $version and maskgit_jax installed in $V"
EOF
)"
  on_workers all "${script}"
}

cmd_train() {
  check_workdir
  # The trainer's command line, as words for a bash array on the worker; EXTRA_ARGS is
  # split there into words on purpose, the other parts are quoted.
  local trainer arg
  # --distributed=on: a TPU VM sets no variable that shows a multi-host job; JAX's
  # GceTpuCluster finds the workers from the VM's metadata server.
  trainer="python -m maskgit_jax.main --distributed=on --config=$(printf %q "${CONFIG}")"
  trainer+=" --workdir=$(printf %q "${WORKDIR}")"
  if [[ -n "${EXTRA_ARGS}" ]]; then trainer+=" ${EXTRA_ARGS}"; fi
  for arg in "${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"}"; do trainer+=" $(printf %q "${arg}")"; done
  local script
  script="$(remote_vars)
TRAINER=(${trainer})
$(cat <<'EOF'
set -euo pipefail
mkdir -p "$L"
alive() { kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" | grep -q '^Z'; }
if [ -f "$L/train.pid" ] && alive "$(cat "$L/train.pid")"; then
  echo "$(hostname): already training (pid $(cat "$L/train.pid")); run 'stop' first" >&2
  exit 1
fi
cd "$R"
export VIRTUAL_ENV="$V" PATH="$V/bin:$PATH"
log="$L/train-$(hostname).log"
echo "=== $(date -u +%FT%TZ) start: ${TRAINER[*]}" >> "$log"
nohup "${TRAINER[@]}" >> "$log" 2>&1 < /dev/null &
echo $! > "$L/train.pid"
echo "$(hostname): started pid $!, log $log"
EOF
)"
  on_workers all "${script}"
}

cmd_logs() {
  local script
  script="$(remote_vars NLINES="${LOG_LINES}")
$(cat <<'EOF'
for f in "$L"/train-*.log; do
  [ -e "$f" ] || { echo "$(hostname): no logs in $L"; continue; }
  echo "==> $(hostname): $f"
  tail -n "$NLINES" "$f"
done
EOF
)"
  on_workers "${WORKER:-0}" "${script}"
}

cmd_stop() {
  local script
  script="$(remote_vars TIMEOUT="${STOP_TIMEOUT}")
$(cat <<'EOF'
# A process that exited but is not reaped yet (a zombie) counts as stopped.
alive() { kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" | grep -q '^Z'; }
pidf="$L/train.pid"
if [ ! -f "$pidf" ] || ! alive "$(cat "$pidf")"; then
  echo "$(hostname): no training running"
  rm -f "$pidf"
  exit 0
fi
pid="$(cat "$pidf")"
kill -TERM "$pid"
echo "$(hostname): sent SIGTERM to $pid; waiting up to ${TIMEOUT}s for the checkpoint"
for _ in $(seq $((TIMEOUT * 5))); do
  if ! alive "$pid"; then
    echo "$(hostname): stopped"
    rm -f "$pidf"
    exit 0
  fi
  sleep 0.2
done
echo "$(hostname): pid $pid still running after ${TIMEOUT}s" >&2
exit 1
EOF
)"
  on_workers all "${script}"
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_LOCATION[@]}"
}

case "${COMMAND}" in
  create) cmd_create ;;
  install) cmd_install ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  *) die "unknown command '${COMMAND}' (expected create, install, train, logs, stop or delete)" ;;
esac
