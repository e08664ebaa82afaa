#!/usr/bin/env bash
# Which torch `make setup` / `make train` install into .venv (the Makefile calls this).
#
#   scripts/torch_setup.sh choose PY CPU_SPEC   # prints pip's torch arguments (maybe none)
#   scripts/torch_setup.sh stale PY             # exit 0 when .venv's torch must be replaced
#   scripts/torch_setup.sh verify PY            # exit 1, one line, when GPUs meet a CPU torch
#
# Where `nvidia-smi -L` lists GPUs: torch==2.13.0 built for CUDA (pinned: the version CI tests;
# PyPI's default torch wheel on Linux is the CUDA build). A torch that is CPU-only (in .venv or
# in the system site-packages .venv sees), or not 2.13, is replaced in .venv, with one line
# saying so; a CUDA torch 2.13 is kept. Without GPUs: any torch found is kept, else CPU_SPEC.
# DRY_RUN=1 prints the `pip uninstall` that `choose` would run instead of running it.
# Messages go to stderr; stdout carries only the arguments for pip.
set -euo pipefail

TORCH_GPU="torch==2.13.0"

gpus() {
  local n
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  echo "${n:-0}"
}

# "VERSION CUDA WHERE" of PY's torch (CUDA "none" for a CPU build; WHERE venv or system),
# or nothing when PY has no torch.
probe() {
  "$1" -c 'import sys, torch
where = "venv" if torch.__file__.startswith(sys.prefix) else "system"
print(torch.__version__, torch.version.cuda or "none", where)' 2>/dev/null || true
}

# Why PY's torch must be replaced on this GPU machine (empty: keep it).
replace_reason() {
  local version=$1 cuda=$2 where=$3
  local place=".venv"
  [[ "$where" == system ]] && place="the system site-packages"
  if [[ "$cuda" == none ]]; then
    echo "GPUs found but torch $version in $place is CPU-only"
  elif [[ "$version" != 2.13.* ]]; then
    echo "torch $version (CUDA $cuda) in $place is not 2.13, the version CI tests"
  fi
}

cmd=${1:?usage: torch_setup.sh choose|stale|verify PY [CPU_SPEC]}
py=${2:?usage: torch_setup.sh choose|stale|verify PY [CPU_SPEC]}
n=$(gpus)
if [[ "$cmd" == stale && "$n" -eq 0 ]]; then
  exit 1  # no GPU: nothing to replace (and no torch import on every make)
fi
read -r version cuda where <<<"$(probe "$py")" || true

case "$cmd" in
  stale)
    [[ "$n" -gt 0 && -n "${version:-}" && -n "$(replace_reason "$version" "$cuda" "$where")" ]]
    ;;
  verify)
    if [[ "$n" -gt 0 && "${cuda:-none}" == none ]]; then
      echo "[setup] nvidia-smi lists $n GPU(s) but torch ${version:-(none)} in $py has no CUDA" \
           "(torch.version.cuda is None): pip picked a CPU wheel; install $TORCH_GPU for CUDA" >&2
      exit 1
    fi
    ;;
  choose)
    cpu_spec=${3:?choose needs the CPU spec}
    if [[ "$n" -eq 0 ]]; then
      if [[ -n "${version:-}" ]]; then
        echo "[setup] leaving existing torch $version alone" >&2
      else
        echo "[setup] no GPU and no torch: installing the CPU wheel $cpu_spec" >&2
        echo "$cpu_spec"
      fi
      exit 0
    fi
    if [[ -z "${version:-}" ]]; then
      echo "[setup] $n GPU(s) found: installing $TORCH_GPU (CUDA)" >&2
      echo "$TORCH_GPU"
      exit 0
    fi
    why=$(replace_reason "$version" "$cuda" "$where")
    if [[ -z "$why" ]]; then
      echo "[setup] leaving existing torch $version (CUDA $cuda) alone" >&2
      exit 0
    fi
    echo "[setup] $why: replacing it in .venv with $TORCH_GPU (CUDA)" >&2
    if [[ "$where" == venv ]]; then
      if [[ -n "${DRY_RUN:-}" ]]; then
        echo "[dry-run] $py -m pip uninstall -y torch" >&2
      else
        "$py" -m pip uninstall -q -y torch >&2
      fi
    fi
    # A torch left in the system site-packages stays: .venv gets its own, found first.
    if [[ "$where" == venv && ( -n "${DRY_RUN:-}" || -z "$(probe "$py")" ) ]]; then
      echo "$TORCH_GPU"
    else
      echo "--ignore-installed $TORCH_GPU"
    fi
    ;;
  *)
    echo "torch_setup.sh: unknown command '$cmd' (choose, stale or verify)" >&2
    exit 2
    ;;
esac
