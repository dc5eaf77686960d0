#!/usr/bin/env bash
# Runs a command with a CUDA compiler (and libclang, for the ABI check) available,
# installing pinned ones from PyPI into a per-user cache when none is found.
#
#   ./scripts/cuda-toolchain.sh cargo test
#   ./scripts/cuda-toolchain.sh            # install only, then print the environment
#
# A CUDA toolkit already found through NVCC, CUDA_HOME, CUDA_PATH or PATH is used
# as it is. The pinned wheels are nvcc 13.0, matching the CUDA 13.0 driver (580)
# of the GPU machines this project's checks run on.
set -euo pipefail

WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-curand==10.4.0.35
)
LIBCLANG_WHEEL=libclang==18.1.1
CACHE="${DROPBLOCK_TOOLCHAIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dropblock}"

say() { echo "cuda-toolchain: $*" >&2; }

# pip_into DIR WHEEL...: installs the wheels into DIR once; the stamp records what
# was installed, so a change of pins reinstalls.
pip_into() {
  local dir=$1; shift
  local want="$*"
  if [[ -f "$dir/.installed" && "$(cat "$dir/.installed")" == "$want" ]]; then
    return
  fi
  say "installing $want into $dir"
  command -v python3 >/dev/null || { say "python3 with pip is needed to install the toolchain"; exit 1; }
  rm -rf "$dir.tmp"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dir.tmp" "$@" >&2
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  echo "$want" > "$dir/.installed"
}

have_nvcc() {
  [[ -n "${NVCC:-}" && -x "${NVCC}" ]] && return 0
  [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]] && return 0
  [[ -n "${CUDA_PATH:-}" && -x "${CUDA_PATH}/bin/nvcc" ]] && return 0
  command -v nvcc >/dev/null
}

if have_nvcc; then
  say "using the CUDA compiler already installed"
else
  pip_into "$CACHE/cuda-13.0" "${WHEELS[@]}"
  export CUDA_HOME="$CACHE/cuda-13.0/nvidia/cu13"
  export PATH="$CUDA_HOME/bin:$PATH"
fi

# bindgen (used only by the test that checks src/abi.rs) needs libclang.
if [[ -z "${LIBCLANG_PATH:-}" ]] && ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'; then
  pip_into "$CACHE/libclang-18.1.1" "$LIBCLANG_WHEEL"
  export LIBCLANG_PATH="$CACHE/libclang-18.1.1/clang/native"
  # The wheel has no clang resource headers (stddef.h, which nvtx-sys's bindgen
  # run needs); the host C compiler's serve.
  if resource=$(${CC:-cc} -print-file-name=include 2>/dev/null) && [[ -f "$resource/stddef.h" ]]; then
    export BINDGEN_EXTRA_CLANG_ARGS="${BINDGEN_EXTRA_CLANG_ARGS:-} -I$resource"
  fi
fi
export DROPBLOCK_REQUIRE_LIBCLANG=1

if [[ $# -eq 0 ]]; then
  echo "export CUDA_HOME=${CUDA_HOME:-} PATH=$PATH LIBCLANG_PATH=${LIBCLANG_PATH:-}"
  exit 0
fi
exec "$@"
