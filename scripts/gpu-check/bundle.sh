#!/usr/bin/env bash
# Builds, here, everything the GPU check needs, and bundles it into gpu-bundle/
# (git-ignored, well under 64 MiB) with the runner for the GPU machine, which has
# nvcc, PyTorch, torchvision, timm, compute-sanitizer and ncu but no Rust.
#
#   ./scripts/gpu-check/bundle.sh [REV]    # then, on the GPU machine:
#   ./gpu-bundle/run.sh                    # logs go to $OUT (or gpu-bundle/logs)
#
# With REV (a commit, e.g. the last one measured), the CLI built at REV goes in too,
# as baseline/dropblock, and run.sh times it against this tree on the same card in
# the same call: the only comparison worth reporting (another card or call is not).
#
# Kernels are built for sm_90 (H100/H200) unless DROPBLOCK_CUDA_ARCHS says otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DROPBLOCK_CUDA_ARCHS="${DROPBLOCK_CUDA_ARCHS:-90}"
repo=$PWD
out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/tests"

if (($#)); then
  rev=$(git rev-parse --verify "$1^{commit}")
  tree=$(mktemp -d)
  git worktree add --detach "$tree" "$rev" >/dev/null
  # Removed even when the build fails, so no stale worktree stays registered.
  trap 'git worktree remove --force "$tree"' EXIT
  # A target dir of its own. Sharing this tree's once embedded the wrong kernels:
  # both checkouts of one package version get the same build-script OUT_DIR, and
  # build.rs's rerun-if-changed=kernels, compared with the other checkout's run,
  # counted as fresh, so one binary carried the other's fatbin (2026-11-30).
  (cd "$tree" && CARGO_TARGET_DIR="$repo/target/baseline" ./scripts/cuda-toolchain.sh cargo build --release --bin dropblock)
  mkdir -p "$out/baseline"
  cp target/baseline/release/dropblock "$out/baseline/dropblock"
  echo "$rev" > "$out/baseline/COMMIT"
fi

# The executables of the test targets, from cargo's JSON messages.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])'
}

# A fatbin built from another checkout's kernels could count as fresh here (see
# above): rebuild it from this tree's.
touch kernels/*
./scripts/cuda-toolchain.sh cargo build --release --bin dropblock
# Copied now: the test build below rebuilds target/release/dropblock with nccl.
cp target/release/dropblock "$out/dropblock"
# Cargo's own messages go to a log (its JSON goes to the pipe), shown on failure.
log=$(mktemp)
built() { "$@" 2>>"$log" || { tail -n 40 "$log" >&2; echo "bundle: failed: $*" >&2; exit 1; }; }
# With the NCCL helper, so gpu_parity's shard test runs a one-rank all-reduce.
built ./scripts/cuda-toolchain.sh cargo test --release --features nccl --no-run --message-format=json | executables |
  while read -r name exe; do
    case "$name" in gpu_parity | kernel_build) cp "$exe" "$out/tests/$name" ;; esac
  done
for t in gpu_parity kernel_build; do
  [[ -x "$out/tests/$t" ]] || { echo "bundle: the $t test binary is missing" >&2; exit 1; }
done
# The candle layer on CUDA (tests/candle_cuda.rs): linked against libcuda, cuBLAS and
# cudart through candle, and large (candle-kernels' PTX), so stripped and gzipped.
mkdir -p "$out/candle"
built ./scripts/cuda-toolchain.sh cargo test --release --features candle-cuda --test candle_cuda --no-run \
  --message-format=json | executables |
  while read -r name exe; do
    # (an `if`: a false `[[ ]] &&` as the loop's last command fails the pipeline)
    if [[ $name == candle_cuda ]]; then
      strip --strip-all -o "$out/candle/candle_cuda" "$exe" && gzip -9 "$out/candle/candle_cuda"
    fi
  done
[[ -f "$out/candle/candle_cuda.gz" ]] || { echo "bundle: the candle_cuda test did not build" >&2; exit 1; }
mkdir -p "$out/examples" "$out/examples-nvtx"
# The examples again with NVTX ranges, for run.sh's nsys capture (the same target
# dir: cargo keeps each feature set's artifacts apart, only the binary's name is shared).
./scripts/cuda-toolchain.sh cargo build --release --features nvtx --example training_step --example side_stream_sampling
for e in training_step side_stream_sampling; do cp "target/release/examples/$e" "$out/examples-nvtx/"; done
./scripts/cuda-toolchain.sh cargo build --release --examples
for e in training_step graph_replay side_stream_sampling; do cp "target/release/examples/$e" "$out/examples/"; done
cp scripts/gpu-check/run.sh scripts/bench/gpu_peers.py scripts/bench/peer_ops.py "$out/"
strip --strip-debug "$out/dropblock" "$out"/tests/* "$out"/examples/* "$out"/examples-nvtx/* "$out"/baseline/dropblock 2>/dev/null || true
{ git rev-parse HEAD | tr -d '\n'; [[ -z $(git status --porcelain --untracked-files=no) ]] || printf -- '-dirty'; echo; } > "$out/COMMIT"
rm -f "$log"
ls -la "$out" "$out/tests"
du -sh "$out"
# The device tool carries at most 64 MiB with the working tree.
size=$(du -sb "$out" | cut -f1)
((size < 60 << 20)) || { echo "bundle: $size bytes, over the 60 MiB the device tool can carry" >&2; exit 1; }
