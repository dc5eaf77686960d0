#!/usr/bin/env python3
"""dropblock's CPU path against a plain copy of the same bytes, and against
torchvision.ops.drop_block2d and timm's drop_block_2d, with the same number of
threads for everyone.

    pip install torch torchvision timm      # CPU is enough
    ./scripts/cuda-toolchain.sh cargo build --release   # or: cargo build --release --no-default-features --features cli
    python3 scripts/bench/cpu_peers.py --threads 2 [--shapes small|resnet|ppyolo|pr17|all]
        [--dtypes f32,bf16] [--iters 7] [--no-peers] [--exe target/release/dropblock]

Prints one markdown table, one row per shape and dtype; times are medians (ms)
after a warm-up, bytes are the floor (x read once, y written once):

  copy ms          torch's `y.copy_(x)` into a preallocated y, torch.set_num_threads(--threads):
                   torch's copy is parallel, so this is the floor with the same threads
                   (a single-threaded numpy copy is a different, slower number; not used)
  copy GB/s        the floor's bytes over copy ms
  dropblock fwd ms `dropblock bench --device cpu` forward, RAYON_NUM_THREADS=--threads
  × copy           dropblock fwd ms / copy ms (target <= 2)
  bwd ms           `dropblock bench --backward`: an apply of the same bytes, reading the
                   y the untimed forward before it wrote (streamed out of the cache
                   when large, so it can take longer than the forward's apply)
  sampling ms      `dropblock bench --sampling`: the mask and scales alone
  sampling share   sampling ms / dropblock fwd ms (target <= 15%)
  torchvision ms, timm ms
                   their forward with a mask per channel (peer_ops.py); "-" with --no-peers
  × torchvision, × timm
                   their ms / dropblock fwd ms (target >= 50 for torchvision)
"""
import argparse
import os
import re
import statistics
import subprocess
import time

import torch

import peer_ops

SHAPES = {
    "resnet": [((256, 1024, 14, 14), 7), ((256, 2048, 7, 7), 7), ((256, 512, 28, 28), 7), ((256, 256, 56, 56), 7)],
    "ppyolo": [((24, 256, 76, 76), 3), ((24, 512, 38, 38), 3), ((24, 1024, 19, 19), 3)],
    "small": [((64, 1024, 14, 14), 7), ((64, 2048, 7, 7), 7), ((8, 256, 76, 76), 3), ((8, 1024, 19, 19), 3)],
    "pr17": [((64, 1024, 14, 14), 7), ((64, 2048, 7, 7), 7), ((8, 256, 76, 76), 3)],
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_ms(fn, iters):
    times = []
    for i in range(iters + 2):
        t = time.perf_counter()
        fn()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def ours(exe, shape, k, dtype, threads, iters, *flags):
    cmd = [exe, "bench", "--device", "cpu", "--shape", ",".join(map(str, shape)), "--block", str(k),
           "--drop-prob", "0.1", "--dtype", dtype, "--iters", str(iters), *flags]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(re.search(r"median_ms=([0-9.]+)", out).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--shapes", default="small", choices=["small", "resnet", "ppyolo", "pr17", "all"])
    ap.add_argument("--dtypes", default="f32,bf16", help="comma-separated, of: f32, bf16")
    ap.add_argument("--no-peers", action="store_true", help="skip torchvision and timm (slow); '-' in their columns")
    ap.add_argument("--exe", default=os.path.join(ROOT, "target", "release", "dropblock"))
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= DTYPES.keys():
        ap.error(f"--dtypes: expected a comma-separated list of {', '.join(DTYPES)}")
    torch.set_num_threads(args.threads)
    if not args.no_peers:
        tv_op, timm_op = peer_ops.torchvision_op(), peer_ops.timm_op()
    shapes = SHAPES["resnet"] + SHAPES["ppyolo"] if args.shapes == "all" else SHAPES[args.shapes]
    peers = f"torch {torch.__version__}, no peers" if args.no_peers else peer_ops.versions()
    print(f"CPU: {args.threads} threads; {peers}; drop_prob 0.1; forward; "
          f"median of {args.iters}; {args.exe}\n")
    print("| shape | k | dtype | copy ms | copy GB/s | dropblock fwd ms | × copy | bwd ms | sampling ms | sampling share "
          "| torchvision ms | × torchvision | timm ms | × timm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, k in shapes:
        for dtype in dtypes:
            x = torch.randn(shape, dtype=DTYPES[dtype])
            y = torch.empty_like(x)
            copy = median_ms(lambda: y.copy_(x), args.iters)
            gbps = 2 * x.numel() * x.element_size() / copy / 1e6
            fwd = ours(args.exe, shape, k, dtype, args.threads, args.iters)
            bwd = ours(args.exe, shape, k, dtype, args.threads, args.iters, "--backward")
            sampling = ours(args.exe, shape, k, dtype, args.threads, args.iters, "--sampling")
            peer_cols = "| - | - | - | - |"
            if not args.no_peers:
                tv = median_ms(lambda: tv_op(x, 0.1, k), args.iters)
                tm = median_ms(lambda: timm_op(x, 0.1, k), args.iters)
                peer_cols = f"| {tv:.2f} | {tv / fwd:.1f} | {tm:.2f} | {tm / fwd:.1f} |"
            print(f"| {'x'.join(map(str, shape))} | {k} | {dtype} | {copy:.2f} | {gbps:.1f} | {fwd:.2f} | "
                  f"{fwd / copy:.2f} | {bwd:.2f} | {sampling:.2f} | {sampling / fwd:.0%} {peer_cols}", flush=True)
            del x, y


if __name__ == "__main__":
    main()
