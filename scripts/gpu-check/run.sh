#!/usr/bin/env bash
# The GPU check, on the GPU machine, from the bundle that bundle.sh made. Writes
# its logs (check.log, sanitizer.log, ncu.csv, ncu-channels-last.csv, peers.md,
# nvtx.csv or nvtx.txt, clocks.csv: the device tool returns at most 8 files) under $OUT, or
# gpu-bundle/logs; clocks.csv holds the SM and memory clocks while the benchmarks
# run. On an H200 (2026-11-30) `check` took 137-165 s and `bench` 172 s with a
# baseline, 15 s of it torch.compile compiling, before the sampling table was added
# (28 more bench runs, about 40 s by the same runs' pace); the timeouts below bound
# each step so that a hang shows where it happened (their sum is not a bound).
#
#   run.sh           parity, sanitizers, CLI cuda-vs-cpu, benchmarks and peers
#   run.sh check     without the benchmarks
#   run.sh bench     the benchmarks alone
#   run.sh layouts   channels-last against channels-first, with ncu (part of bench)
#   run.sh ranks     1D/3D against 2D (part of bench)
#   run.sh sampling  the sampling alone against the forward (part of bench)
#   (parts combine: `run.sh check bench`; a part runs once, whichever asks first)
#
# DROPBLOCK_CHECK_SECONDS (default 540) is the whole run's budget: the peer
# benchmark, the last and longest step, gets what is left of it, and writes its
# table row by row, so a run cut short keeps what it measured.
set -uo pipefail
shopt -s nullglob
B="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$B/logs}"
mkdir -p "$OUT"
cd "$B" || exit
failures=()
not_run=()
ran=()
END=$((SECONDS + ${DROPBLOCK_CHECK_SECONDS:-540}))
# `once PART`: false (and says so) when PART already ran in this call.
once() {
  if [[ " ${ran[*]} " == *" $1 "* ]]; then echo "($1: already run in this call)"; return 1; fi
  ran+=("$1")
}
section() { echo; echo "=== $* ($(date -u +%FT%TZ))"; }
fail() { failures+=("$1"); echo "FAILED: $1"; }
# A part whose tool is missing is reported by name, never counted as passed;
# DROPBLOCK_REQUIRE_TOOLS=1 (the self-hosted workflow) makes it a failure.
skip() { not_run+=("$1"); echo "NOT RUN: $1"; }
have() { command -v "$1" >/dev/null || { skip "$2 ($1 is not on PATH)"; return 1; }; }
# `median_ms BINARY ARGS...`: the median of a `dropblock bench` run, empty if it failed.
# shellcheck disable=SC2329 # called through bench_rows
median_ms() { timeout 10 "$@" | sed -n 's/^median_ms=\([0-9.]*\).*/\1/p'; }
# `ratio A B`: A / B to two places.
# shellcheck disable=SC2329 # called through bench_rows
ratio() { python3 -c "print(f'{$1 / $2:.2f}')" 2>/dev/null; }
# `bench_rows SECONDS WHAT ROW "SHAPE K"...`: calls `ROW shape k dtype pass` for each
# shape in f32 and bf16, forward and backward, with `flags` set to that row's
# `dropblock bench` flags; after SECONDS more seconds the rest fail as out of time.
bench_rows() {
  local until=$((SECONDS + $1)) what=$2 row=$3 args shape k dtype pass
  shift 3
  for args in "$@"; do
    read -r shape k <<<"$args"
    for dtype in f32 bf16; do
      for pass in forward backward; do
        if ((SECONDS > until)); then fail "$what: out of time at $shape $dtype $pass"; return; fi
        flags=(bench --device cuda --shape "$shape" --block "$k" --dtype "$dtype" --iters 15)
        [[ $pass == backward ]] && flags+=(--backward)
        "$row" "$shape" "$k" "$dtype" "$pass"
      done
    done
  done
}

main() {
  local modes=("${@:-all}") mode

  section "machine"
  echo "bundle commit: $(cat COMMIT 2>/dev/null)"
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv

  for mode in "${modes[@]}"; do
    case "$mode" in
      all) checks; benchmarks ;;
      check) checks ;;
      bench) benchmarks ;;
      layouts) layouts ;;
      ranks) ranks ;;
      sampling) sampling ;;
      *) fail "unknown part: $mode" ;;
    esac
  done

  section "summary"
  ((${#not_run[@]})) && printf 'NOT RUN: %s\n' "${not_run[@]}"
  if ((${#not_run[@]})) && [[ "${DROPBLOCK_REQUIRE_TOOLS:-}" == 1 ]]; then
    failures+=("parts not run under DROPBLOCK_REQUIRE_TOOLS=1")
  fi
  if ((${#failures[@]})); then
    printf 'FAILED: %s\n' "${failures[@]}"
    exit 1
  fi
  echo "GPU check passed (${modes[*]})"
}

checks() {
  once checks || return 0
  section "GPU tests, DROPBLOCK_REQUIRE_GPU=1"
  export DROPBLOCK_REQUIRE_GPU=1
  # gpu_parity is built with --features nccl; cudarc opens libnccl.so, which
  # PyTorch's wheel ships as nvidia/nccl/lib/libnccl.so.2: link it where the loader looks.
  local nccl
  nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
  if [[ -n "$nccl" && -f "$nccl" ]]; then
    local nccl_dir
    nccl_dir=$(mktemp -d)
    ln -s "$nccl" "$nccl_dir/libnccl.so"
    export LD_LIBRARY_PATH="$nccl_dir:${LD_LIBRARY_PATH:-}"
    # Linked where the loader looks: gpu_parity must then run the all-reduce.
    export DROPBLOCK_REQUIRE_NCCL=1
    echo "libnccl.so -> $nccl"
  else
    skip "the one-rank NCCL all-reduce in gpu_parity (no nvidia.nccl in python3)"
  fi
  # vector_kernels_store_whole_vectors compiles the kernels' PTX with the build
  # machine's nvcc, from the build machine's sources: a check of the build that CI
  # runs there, and whose paths do not exist here.
  echo "--- tests/kernel_build"
  timeout 150 tests/kernel_build --test-threads 4 --skip vector_kernels_store_whole_vectors || fail tests/kernel_build
  echo "(vector_kernels_store_whole_vectors left to the build machine's cargo test)"
  echo "--- tests/gpu_parity"
  # gpu_parity's tensor past 2^31 elements takes ~30 s of host work.
  timeout 150 tests/gpu_parity --test-threads 4 || fail tests/gpu_parity

  section "the candle layer on CUDA (candle/candle_cuda), DROPBLOCK_REQUIRE_GPU=1"
  if [[ -f candle/candle_cuda.gz ]]; then
    local bin lib
    bin=$(mktemp -d)/candle_cuda
    gunzip -c candle/candle_cuda.gz > "$bin" && chmod +x "$bin"
    # It links cuBLAS, cuRAND and cudart 13: the toolkit's, beside nvcc.
    lib=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")/../lib64
    if LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}" ldd "$bin" | grep "not found"; then
      fail "candle_cuda cannot load its libraries (above; looked in $lib)"
    else
      LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}" timeout 120 "$bin" --test-threads 1 || fail "candle_cuda"
    fi
  else
    skip "the candle layer on CUDA (no candle/candle_cuda.gz in this bundle)"
  fi

  section "the examples"
  for e in examples/*; do
    echo "--- $e"
    timeout 60 "$e" || fail "$e"
  done

  section "NVTX ranges (the examples built with --features nvtx)"
  if ! command -v nsys >/dev/null && command -v ncu >/dev/null; then
    # No nsys on the lent machines (2026-11-30): ncu records the NVTX stack of each
    # kernel it profiles (--nvtx), and prints it with the kernel's section.
    echo "nsys is not on PATH: the ranges as ncu sees them"
    : > "$OUT/nvtx.txt"
    for e in training_step side_stream_sampling; do
      timeout 60 ncu --nvtx --clock-control none --kernel-name regex:"^dropblock" --launch-count 12 \
        --metrics gpu__time_duration.sum "examples-nvtx/$e" >> "$OUT/nvtx.txt" 2>&1 ||
        { tail -n 20 "$OUT/nvtx.txt"; fail "ncu --nvtx $e"; }
    done
    for r in forward backward sample apply; do
      if grep -q "dropblock::$r " "$OUT/nvtx.txt"; then echo "range dropblock::$r: present"; else fail "range dropblock::$r missing (ncu --nvtx; see nvtx.txt)"; fi
    done
  elif have nsys "the NVTX ranges' nsys capture"; then
    local cap
    cap=$(mktemp -d)
    timeout 120 nsys profile --trace cuda,nvtx --force-overwrite true --output "$cap/ranges" \
      bash -c 'examples-nvtx/training_step && examples-nvtx/side_stream_sampling' > "$cap/profile.log" 2>&1 ||
      { tail -n 20 "$cap/profile.log"; fail "nsys profile"; }
    timeout 60 nsys stats --report nvtx_sum --format csv --output - "$cap/ranges.nsys-rep" > "$OUT/nvtx.csv" 2>&1 ||
      fail "nsys stats"
    for r in forward backward sample apply; do
      if grep -q "dropblock::$r " "$OUT/nvtx.csv"; then echo "range dropblock::$r: present"; else fail "range dropblock::$r missing"; fi
    done
  fi

  section "compute-sanitizer on a short parity run"
  # The quick run leaves NCCL out: its init probes its kernels with
  # cudaFuncGetAttributes, and memcheck reports each "no kernel image" that NCCL
  # expects and handles as an error (2026-11-30; hiding PyTorch's libnccl is not
  # enough, the machine has its own). The shard kernels still run under every
  # tool; the one-rank all-reduce ran in the plain run above.
  have compute-sanitizer "compute-sanitizer's four tools" &&
  for tool in memcheck racecheck initcheck synccheck; do
    echo "--- $tool"
    DROPBLOCK_PARITY_QUICK=1 timeout 40 compute-sanitizer --tool "$tool" --error-exitcode 86 \
      tests/gpu_parity --test-threads 1 --skip large_shapes --skip every_launch_path --skip out_of_device_memory \
      --skip past_2_pow_31 \
      > "$OUT/sanitizer-$tool.tmp" 2>&1 || fail "compute-sanitizer $tool"
    tail -n 4 "$OUT/sanitizer-$tool.tmp"
    { echo "=== $tool"; cat "$OUT/sanitizer-$tool.tmp"; } >> "$OUT/sanitizer.log" && rm "$OUT/sanitizer-$tool.tmp"
  done

  section "dropblock apply --device cuda against --device cpu"
  work=$(mktemp -d)
  python3 - "$work" <<'PY' || fail "making .npy inputs"
import sys, numpy as np
d = sys.argv[1]
rng = np.random.default_rng(0)
np.save(f"{d}/x_f32.npy", rng.standard_normal((4, 64, 28, 28)).astype(np.float32))
np.save(f"{d}/x_f16.npy", rng.standard_normal((2, 32, 19, 19)).astype(np.float16))
np.save(f"{d}/x_f32_3d.npy", rng.standard_normal((2, 8, 6, 14, 14)).astype(np.float32))
np.save(f"{d}/x_f16_1d.npy", rng.standard_normal((4, 16, 300)).astype(np.float16))
try:
    import ml_dtypes
    np.save(f"{d}/x_bf16.npy", rng.standard_normal((2, 16, 56, 70)).astype(ml_dtypes.bfloat16))
except ImportError:
    print("ml_dtypes missing: no bf16 file")
PY
  for x in "$work"/x_*.npy; do
    for flags in "--block 7 --drop-prob 0.1" \
                 "--block 4x6 --drop-prob 0.2 --placement anywhere --share channels --normalize per-sample --gamma exact" \
                 "--block 4 --drop-prob 0.2 --placement anywhere --anchor centered-right --gamma per-block --share channels" \
                 "--block 3 --drop-prob 0.3 --normalize expected --seed 9 --offset 170" \
                 "--block 3 --drop-prob 0.2 --layout channels-last --normalize per-sample --seed 5" \
                 "--block 5 --drop-prob 0.15 --layout channels-last --share channels --seed 2" \
                 "--block 3 --drop-prob 0.25 --fill noise --normalize none --seed 11 --offset 34"; do
      # The 4x6 block is 2D; the 1D and 3D files take the uniform blocks.
      [[ $flags == *4x6* && $x == *_[13]d.npy ]] && continue
      for dev in cpu cuda; do
        # shellcheck disable=SC2086
        timeout 10 ./dropblock apply --input "$x" --output "$work/y_$dev.npy" --keep-mask "$work/m_$dev.npy" $flags \
          --device $dev
        rc=$?
        if ((rc)); then
          fail "apply $dev $(basename "$x") $flags (exit $rc)"
          # One hang is enough to know; the rest would only spend the budget.
          ((rc == 124)) && break 3
        fi
      done
      if cmp -s "$work/y_cpu.npy" "$work/y_cuda.npy" && cmp -s "$work/m_cpu.npy" "$work/m_cuda.npy"; then
        echo "same: $(basename "$x") $flags"
      else
        fail "apply cuda != cpu: $(basename "$x") $flags"
      fi
    done
  done

}

benchmarks() {
  once benchmarks || return 0
  # The clocks while the benchmarks run, so each figure can be read against them.
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw --format=csv -lms 50 > "$OUT/clocks.csv" &
  local clocks=$!

  section "per-kernel times (ncu): the count pass's share of the forward"
  have ncu "the per-kernel times" &&
  # Four launches past the first 20 (each forward is two matching launches, and
  # the bench runs at least 3 + 20 forwards); sm__cycles... is the SM clock.
  for args in "256,2048,7,7 7 bf16" "256,1024,14,14 7 bf16" "256,1024,14,14 7 f32" "24,256,76,76 3 bf16"; do
    read -r shape k dtype <<<"$args"
    echo "--- $shape k=$k $dtype"
    timeout 20 ncu --clock-control none --kernel-name regex:"^dropblock" --launch-skip 20 --launch-count 4 \
      --metrics gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second --csv \
      ./dropblock bench --device cuda --shape "$shape" --block "$k" --dtype "$dtype" --iters 20 \
      > "$OUT/ncu.tmp" 2>&1 || fail "ncu $shape $dtype"
    grep -E '"dropblock' "$OUT/ncu.tmp" | awk -F'","' '{print $5, $(NF-2), $NF}' | tail -n 8
    { echo "=== $shape k=$k $dtype"; cat "$OUT/ncu.tmp"; } >> "$OUT/ncu.csv" && rm "$OUT/ncu.tmp"
  done

  if [[ -x baseline/dropblock ]]; then
    section "this tree against the baseline $(cat baseline/COMMIT), same card, same call"
    # A baseline from before `--from-idle` (c00d35a) times each call from an idle
    # stream, and this tree is timed so beside it; a later one has the flag, and
    # both are timed the default way.
    this_flags=(--from-idle)
    baseline/dropblock bench --help | grep -q -- --from-idle && this_flags=()
    echo "method: ${this_flags[*]:-busy stream (both)}"
    echo "| shape | k | dtype | pass | baseline ms | this ms | × |"
    echo "|---|---|---|---|---|---|---|"
    bench_rows 80 "baseline comparison" baseline_row \
      "256,256,56,56 7" "256,1024,14,14 7" "256,2048,7,7 7" "24,256,76,76 3" "24,1024,19,19 3"
  fi

  sampling
  layouts
  ranks

  section "benchmarks: dropblock bench and the peers"
  local left=$((END - SECONDS))
  if ((left < 60)); then
    fail "gpu_peers.py: out of time (${left} s of DROPBLOCK_CHECK_SECONDS left)"
  elif python3 -c "import torch, torchvision, timm" 2>/dev/null; then
    # Up to ~2 minutes of it is torch.compile compiling (untimed, reported apart).
    timeout $((left < 300 ? left : 300)) python3 gpu_peers.py --out "$OUT/peers.md" || fail "gpu_peers.py"
  else
    skip "the peer benchmark (PyTorch, torchvision and timm are needed)"
  fi
  kill "$clocks" 2>/dev/null
}

layouts() {
  once layouts || return 0
  section "layouts: channels-last against channels-first"
  # Issues 21 and 22's targets: each within 10% of its channels-first / 2D pair.
  echo "| shape | k | dtype | pass | first ms | last ms | last/first |"
  echo "|---|---|---|---|---|---|---|"
  bench_rows 90 layouts layout_row "256,1024,14,14 7" "256,2048,7,7 7" "24,256,76,76 3" "8,256,16,28,28 5"

  section "per-kernel times (ncu) of channels-last forwards: count, transpose, apply"
  have ncu "the channels-last per-kernel times" &&
  # Three launches per forward (count_mask, channels_last_bits, apply).
  for args in "256,1024,14,14 7 bf16" "256,2048,7,7 7 bf16" "24,256,76,76 3 bf16"; do
    read -r shape k dtype <<<"$args"
    echo "--- channels-last $shape k=$k $dtype"
    timeout 30 ncu --clock-control none --kernel-name regex:"^dropblock" --launch-skip 30 --launch-count 6 \
      --metrics gpu__time_duration.sum --csv \
      ./dropblock bench --device cuda --shape "$shape" --block "$k" --dtype "$dtype" --layout channels-last --iters 20 \
      > "$OUT/ncu.tmp" 2>&1 || fail "ncu channels-last $shape $dtype"
    grep -E '"dropblock' "$OUT/ncu.tmp" | awk -F'","' '{print $5, $NF}'
    { echo "=== channels-last $shape k=$k $dtype"; cat "$OUT/ncu.tmp"; } >> "$OUT/ncu-channels-last.csv" && rm "$OUT/ncu.tmp"
  done
}

sampling() {
  once sampling || return 0
  section "sampling alone (sample_into: the count pass) against the forward"
  # Issue 17's target: the count pass at most 10% of the forward on every row of
  # the seven benchmark shapes (ncu above splits four of them by kernel).
  echo "| shape | k | dtype | forward ms | sampling ms | sampling / forward |"
  echo "|---|---|---|---|---|---|"
  bench_rows 60 sampling sampling_row "256,256,56,56 7" "256,512,28,28 7" "256,1024,14,14 7" "256,2048,7,7 7" \
    "24,256,76,76 3" "24,512,38,38 3" "24,1024,19,19 3"
}

ranks() {
  once ranks || return 0
  section "ranks: 1D/3D beside 2D of the same element count and seed density"
  echo "| shape | k | dtype | pass | ms | GB/s |"
  echo "|---|---|---|---|---|---|"
  bench_rows 40 ranks rank_row "8,256,112,112 9" "8,256,16,28,28 5" "64,512,64,64 4" "64,512,4096 15"
}

# The rows of the three tables (arguments: shape k dtype pass; `flags` set).
# shellcheck disable=SC2329 # called through bench_rows
baseline_row() {
  # Alternating, so a drift of the clock or temperature hits both alike; timed
  # alike (this_flags, above).
  local base this
  base=$(median_ms baseline/dropblock "${flags[@]}")
  this=$(median_ms ./dropblock "${flags[@]}" "${this_flags[@]}")
  [[ -n $base && -n $this ]] || fail "baseline comparison $1 $3 $4"
  echo "| $1 | $2 | $3 | $4 | $base | $this | $(ratio "$base" "$this") |"
}

# shellcheck disable=SC2329 # called through bench_rows
layout_row() {
  local first last
  first=$(median_ms ./dropblock "${flags[@]}" --layout channels-first)
  last=$(median_ms ./dropblock "${flags[@]}" --layout channels-last)
  [[ -n $first && -n $last ]] || fail "layouts $1 $3 $4"
  echo "| $1 | $2 | $3 | $4 | $first | $last | $(ratio "$last" "$first") |"
}

# shellcheck disable=SC2329 # called through bench_rows
sampling_row() {
  [[ $4 == forward ]] || return 0
  local forward sampling
  forward=$(median_ms ./dropblock "${flags[@]}")
  sampling=$(median_ms ./dropblock "${flags[@]}" --sampling)
  [[ -n $forward && -n $sampling ]] || fail "sampling $1 $3"
  echo "| $1 | $2 | $3 | $forward | $sampling | $(ratio "$sampling" "$forward") |"
}

# shellcheck disable=SC2329 # called through bench_rows
rank_row() {
  local line
  line=$(timeout 10 ./dropblock "${flags[@]}" | grep '^median_ms=')
  [[ -n $line ]] || fail "ranks $1 $3 $4"
  echo "| $1 | $2 | $3 | $4 | $(sed -n 's/^median_ms=\([0-9.]*\).*/\1/p' <<<"$line") | $(sed -n 's/.*gbps=\([0-9.]*\).*/\1/p' <<<"$line") |"
}

main "$@" 2>&1 | tee -a "$OUT/check.log"
exit "${PIPESTATUS[0]}"
