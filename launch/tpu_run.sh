#!/usr/bin/env bash
# Runs one atlas-jax command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_run.sh --tpu my-v5e-32 --zone us-west4-a --project my-proj --install . \
#       -- --config=configs/sft_qwen25vl_7b.py --workdir=/mnt/gcs/runs/sft --config.optim.lr=1e-5
#
# The workdir must be one directory that every worker sees (e.g. a bucket mounted with gcsfuse at
# the same path on each): all processes write the checkpoints together.
#
# The same command runs on all workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`):
# JAX's multi-controller runtime needs every host to start the same program, and
# `--config.distributed=True` (added here) makes each call `jax.distributed.initialize()`,
# which finds the other workers from the TPU metadata.
#
# Logs: each worker tees its output to LOGDIR/worker-<i>.log on its own disk (i = the TPU
# worker number from the metadata server), so a log survives a dropped ssh session; with
# --local-logs gcloud also writes one <i>.log per worker on this machine.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_run.sh [options] -- --config=configs/X.py[:arg] --workdir=DIR [--config.a.b=V ...]

Runs `python3 -m atlas_jax.main ARGS` on every worker of a Cloud TPU VM (pod slice), from
REMOTE_DIR (so configs/ paths resolve), with --config.distributed=True appended unless given.

Required settings (flag, or environment variable):
  --tpu NAME          TPU VM name                      (TPU_NAME)
  --zone ZONE         its zone                         (TPU_ZONE, else CLOUDSDK_COMPUTE_ZONE)
  --project PROJECT   its Google Cloud project         (TPU_PROJECT, else CLOUDSDK_CORE_PROJECT)

Options:
  --install SRC       first put the package on every worker and pip-install it (with jax[tpu]):
                      SRC is a local directory (tar'ed without .git, copied with
                      `gcloud compute tpus tpu-vm scp`) or a git URL (cloned on the workers);
                      it replaces REMOTE_DIR on the workers
  --remote-dir DIR    checkout on the workers, relative to their home (default: atlas-jax)
  --env KEY=VAL       set an environment variable for the run (repeatable); these are also
                      forwarded when set here: JAX_* (except JAX_PLATFORMS), XLA_FLAGS,
                      LIBTPU_INIT_ARGS, TPU_STDERR_LOG_LEVEL, TPU_MIN_LOG_LEVEL, TFDS_DATA_DIR
  --logdir DIR        log directory on each worker, relative to its home (default: atlas_logs);
                      worker i writes DIR/worker-i.log
  --local-logs DIR    also write one log per worker here (gcloud --output-directory)
  --detach            start the job with nohup and return at once (follow the worker logs)
  --worker W          workers to run on (default: all; a multi-host run needs all)
  --python PY         interpreter on the workers (default: python3)
  --internal-ip       reach the workers by internal IP (from a VM in the same VPC)
  --dry-run           print the commands instead of running them
  -h, --help          this help

Workers are reached with `gcloud compute tpus tpu-vm ssh --worker=all`, which needs your key in
an ssh agent first (`ssh-add ~/.ssh/google_compute_engine`). Their login shell must be bash (the
TPU VM images' default). Exit status: 2 for a usage error (missing setting, bad flag); otherwise
gcloud's, which is non-zero when the job fails on a worker.
EOF
}

die() {
  echo "tpu_run.sh: $1" >&2
  echo "Run 'launch/tpu_run.sh --help' for usage." >&2
  exit 2
}

# One shell word for $1: plain when safe, else single-quoted (' becomes '\'').
quote() {
  local s=$1 sq="'\\''"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/"$sq"}"
  fi
}

# The same for words of the worker's script, double-quoted where that needs no escapes, so the
# script reads clearly inside the single quotes of the printed --command.
rquote() {
  local s=$1
  if [[ -n $s && ! $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ && ! $s =~ [\"\$\`\\!] ]]; then
    printf '"%s"' "$s"
  else
    quote "$s"
  fi
}

# The arguments as one shell-quoted line: quote_all FUNC ARGS... (FUNC: quote or rquote).
quote_all() {
  local fn=$1 out="" a
  shift
  for a in "$@"; do
    out+="${out:+ }$("$fn" "$a")"
  done
  printf '%s' "$out"
}

# A path given relative to the worker's home; a leading ~/ means the same.
remote_path() {
  local p=${1#\~/}
  [[ -n $p ]] || die "empty remote path"
  rquote "$p"
}

tpu=${TPU_NAME:-}
zone=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
project=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
install=""
remote_dir="atlas-jax"
logdir="atlas_logs"
local_logs=""
detach=0
worker="all"
python="python3"
internal_ip=0
dry_run=0
envs=()

need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --tpu) need_value "$@"; tpu=$2; shift 2 ;;
    --tpu=*) tpu=${1#*=}; shift ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --zone=*) zone=${1#*=}; shift ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --project=*) project=${1#*=}; shift ;;
    --install) need_value "$@"; install=$2; shift 2 ;;
    --install=*) install=${1#*=}; shift ;;
    --remote-dir) need_value "$@"; remote_dir=$2; shift 2 ;;
    --remote-dir=*) remote_dir=${1#*=}; shift ;;
    --env) need_value "$@"; envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --logdir) need_value "$@"; logdir=$2; shift 2 ;;
    --logdir=*) logdir=${1#*=}; shift ;;
    --local-logs) need_value "$@"; local_logs=$2; shift 2 ;;
    --local-logs=*) local_logs=${1#*=}; shift ;;
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    --worker=*) worker=${1#*=}; shift ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --python=*) python=${1#*=}; shift ;;
    --detach) detach=1; shift ;;
    --internal-ip) internal_ip=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the job's own flags go after '--')" ;;
  esac
done
job_args=("$@")

# ---------------------------------------------------------------- settings
[[ -n $tpu ]] || die "no TPU name: pass --tpu NAME or set TPU_NAME"
[[ -n $zone ]] || die "no zone: pass --zone ZONE or set TPU_ZONE (or CLOUDSDK_COMPUTE_ZONE)"
[[ -n $project ]] || die "no project: pass --project PROJECT or set TPU_PROJECT (or CLOUDSDK_CORE_PROJECT)"

has_config=0
has_workdir=0
has_distributed=0
for a in ${job_args[@]+"${job_args[@]}"}; do  # (bash 3.2, macOS: an empty array is unset)
  case $a in
    --config | --config=*) has_config=1 ;;
    --workdir | --workdir=*) has_workdir=1 ;;
    --config.distributed=* | --config.distributed | --noconfig.distributed) has_distributed=1 ;;
  esac
done
[[ $has_config == 1 ]] || die "no job config: put --config=configs/X.py[:arg] after '--'"
[[ $has_workdir == 1 ]] || die "no workdir: put --workdir=DIR after '--' (a directory every worker shares, e.g. a gcsfuse mount)"
# Appended last: ml_collections rejects an override that comes before --config.
[[ $has_distributed == 1 ]] || job_args+=("--config.distributed=True")

# ---------------------------------------------------------------- environment
env_words=("PYTHONUNBUFFERED=1")  # progress lines reach the log as they are printed
for kv in "${envs[@]+"${envs[@]}"}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv': expected KEY=VALUE with KEY a variable name"
  env_words+=("$kv")
done
# JAX_PLATFORMS stays behind: a CPU-only setting from local tests would silently run the pod on CPU.
while IFS= read -r name; do
  case $name in
    JAX_PLATFORMS) ;;
    JAX_* | XLA_FLAGS | LIBTPU_INIT_ARGS | TPU_STDERR_LOG_LEVEL | TPU_MIN_LOG_LEVEL | TFDS_DATA_DIR)
      env_words+=("$name=${!name}") ;;
  esac
done < <(compgen -e | sort)

# ---------------------------------------------------------------- commands
gcloud_target=("$tpu" "--zone=$zone" "--project=$project" "--worker=$worker")
[[ $internal_ip == 1 ]] && gcloud_target+=("--internal-ip")

run() {
  if [[ $dry_run == 1 ]]; then
    quote_all quote "$@"
    echo
  else
    "$@"
  fi
}

# ssh_all SCRIPT [gcloud flags...]: SCRIPT runs on every selected worker, in its login shell
# (bash on the TPU VM images; `set -o pipefail` makes a failed job fail the ssh).
ssh_all() {
  local script=$1
  shift
  run gcloud compute tpus tpu-vm ssh "${gcloud_target[@]}" "$@" --command "$script"
}

# pack_source DIR ARCHIVE: a git checkout ships its tracked and untracked-but-not-ignored files
# (uncommitted edits included, workdirs and virtualenvs left out); another directory ships all
# but .git, caches and virtualenvs.
pack_source() {
  local src=$1 out=$2
  if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    if [[ $dry_run == 1 ]]; then
      echo "git -C $(quote "$src") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$src") --null -T - -czf $(quote "$out")"
    else
      git -C "$src" ls-files -z --cached --others --exclude-standard | tar -C "$src" --null -T - -czf "$out"
    fi
  else
    run tar -C "$src" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=.venv -czf "$out" .
  fi
}

rdir=$(remote_path "$remote_dir")
if [[ -n $install ]]; then
  pip_line="$(rquote "$python") -m pip install --quiet --upgrade \"jax[tpu]\" -e $rdir"
  if [[ -d $install ]]; then
    archive=$(mktemp "${TMPDIR:-/tmp}/atlas-jax-src.XXXXXX")  # (BSD mktemp: X's last)
    trap 'rm -f "$archive"' EXIT
    pack_source "$install" "$archive"
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu:atlas-jax-src.tar.gz" "${gcloud_target[@]:1}"
    ssh_all "set -euo pipefail; rm -rf $rdir; mkdir -p $rdir; tar -xzf atlas-jax-src.tar.gz -C $rdir; rm atlas-jax-src.tar.gz; $pip_line"
  elif [[ $install =~ ^(git\+|https?://|ssh://|git://|git@) ]]; then
    url=$(rquote "${install#git+}")
    ssh_all "set -euo pipefail; rm -rf $rdir.new; git clone --quiet --depth 1 $url $rdir.new; rm -rf $rdir; mv $rdir.new $rdir; $pip_line"
  else
    die "--install '$install': expected a local directory or a git URL (https://, ssh://, git@, git+)"
  fi
fi

main_cmd="env $(quote_all rquote "${env_words[@]}") $(rquote "$python") -m atlas_jax.main $(quote_all rquote "${job_args[@]}")"
# Expanded on the worker: its number from the TPU metadata server.
# shellcheck disable=SC2016
worker_id='w=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
setup="set -euo pipefail; $worker_id; mkdir -p $(remote_path "$logdir"); log=\$(cd $(remote_path "$logdir") && pwd)/worker-\$w.log; cd $rdir"
if [[ $detach == 1 ]]; then
  script="$setup; nohup $main_cmd >\"\$log\" 2>&1 </dev/null & echo \"worker \$w: pid \$! log \$log\""
else
  script="$setup; $main_cmd 2>&1 | tee \"\$log\""
fi

log_flags=()
if [[ -n $local_logs ]]; then
  [[ $dry_run == 1 ]] || mkdir -p "$local_logs"
  log_flags+=("--output-directory=$local_logs")
fi
ssh_all "$script" "${log_flags[@]+"${log_flags[@]}"}"
