#!/usr/bin/env bash
# Runs mage_jax on this host (CPU, one GPU or several, a single TPU VM host).
#
#   launch/local.sh CONFIG WORKDIR [OVERRIDES...]
#   launch/local.sh configs/fashion_mnist_tiny.py runs/tiny --config.total_steps=20
#   DRY_RUN=1 launch/local.sh configs/mage_pretrain.py:variant=B,runlocal runs/b
#
# A dry run prints the command (shell-quoted, one line) instead of running it. It is asked for with
# DRY_RUN=1 (also true/yes/on, any case; 0/false/no/off or unset runs; anything else is an error) or
# with --dry-run[=BOOL] anywhere on the line (it is the launcher's flag, never passed to training).
#
# Environment:
#   DRY_RUN    see above.
#   PYTHON     interpreter (default: the repo's .venv/bin/python if present,
#              else python3).
# Run from the repository root (configs are repo-relative) or install the
# package with `pip install -e .`.
set -euo pipefail

# Sets `dry` to 1 or 0 from a yes/no spelling ($1), or exits 2 naming it ($2).
set_dry() {
  case "${1,,}" in
    1 | true | yes | on) dry=1 ;;
    0 | false | no | off) ;;
    *)
      echo "error: $2='$1' is not a yes/no value (use 1/true/yes/on or 0/false/no/off)" >&2
      exit 2
      ;;
  esac
}

dry=0
set_dry "${DRY_RUN:-0}" DRY_RUN
args=()
for a in "$@"; do
  case "$a" in
    --dry-run | --dry_run) dry=1 ;;
    --dry-run=* | --dry_run=*) set_dry "${a#*=}" "${a%%=*}" ;;
    *) args+=("$a") ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [OVERRIDES...]  (e.g. $0 configs/fashion_mnist_tiny.py runs/tiny)" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
if [[ -z $config || -z $workdir ]]; then
  echo "error: CONFIG and WORKDIR must be non-empty" >&2
  exit 2
fi
for o in "$@"; do
  if [[ $o != --* ]]; then
    echo "error: override '$o' is not a flag; write it as --config.<key>=<value>" >&2
    exit 2
  fi
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $repo_root/.venv/bin/python ]]; then
    PYTHON=$repo_root/.venv/bin/python
  else
    PYTHON=python3
  fi
fi

cmd=("$PYTHON" -m mage_jax.main "--config=$config" "--workdir=$workdir" "$@")

# Same quoting as Python's shlex.quote, so the printed line round-trips through
# shlex.split (bash's printf %q can emit $'...' forms that shlex rejects).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

if [[ $dry == 1 ]]; then
  line=""
  for a in "${cmd[@]}"; do
    line+="${line:+ }$(quote "$a")"
  done
  printf '%s\n' "$line"
  exit 0
fi
exec "${cmd[@]}"
