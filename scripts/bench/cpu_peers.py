#!/usr/bin/env python3
"""dropblock's CPU path against torchvision.ops.drop_block2d and timm's
drop_block_2d on the CPU, with the same number of threads for everyone.

    pip install torch torchvision timm      # CPU is enough
    ./scripts/cuda-toolchain.sh cargo build --release   # or: cargo build --release --no-default-features --features cli
    python3 scripts/bench/cpu_peers.py --threads 2 [--shapes small|resnet|ppyolo|all]

Prints one markdown table of median forward times (ms) and our speedup. Bytes are
the floor: x read once, y written once.
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
}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_ms(fn, iters):
    times = []
    for i in range(iters + 2):
        t = time.perf_counter()
        fn()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def ours(shape, k, dtype, threads, iters):
    exe = os.path.join(ROOT, "target", "release", "dropblock")
    cmd = [exe, "bench", "--device", "cpu", "--shape", ",".join(map(str, shape)), "--block", str(k),
           "--drop-prob", "0.1", "--dtype", dtype, "--iters", str(iters)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(re.search(r"median_ms=([0-9.]+)", out).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--shapes", default="small", choices=["small", "resnet", "ppyolo", "all"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tv_op, timm_op = peer_ops.torchvision_op(), peer_ops.timm_op()
    shapes = SHAPES["resnet"] + SHAPES["ppyolo"] if args.shapes == "all" else SHAPES[args.shapes]
    print(f"CPU: {args.threads} threads; {peer_ops.versions()}; drop_prob 0.1; forward; median of {args.iters}\n")
    print("| shape | k | dtype | dropblock ms | GB/s | torchvision ms | timm ms | × torchvision | × timm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, k in shapes:
        for dtype, tdtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            x = torch.randn(shape, dtype=tdtype)
            tv = median_ms(lambda: tv_op(x, 0.1, k), args.iters)
            tm = median_ms(lambda: timm_op(x, 0.1, k), args.iters)
            ms = ours(shape, k, dtype, args.threads, args.iters)
            gbps = 2 * x.numel() * x.element_size() / ms / 1e6
            print(f"| {'x'.join(map(str, shape))} | {k} | {dtype} | {ms:.2f} | {gbps:.1f} | {tv:.2f} | {tm:.2f} | "
                  f"{tv / ms:.1f} | {tm / ms:.1f} |", flush=True)
            del x


if __name__ == "__main__":
    main()
