#!/usr/bin/env python3
"""DropBlock against its peers and the copy roofline, on one GPU, in one run.

Times, with CUDA events and L2 flushed between iterations:
  - a plain device-to-device copy of the same bytes (the roofline),
  - torchvision.ops.drop_block2d and timm's drop_block_2d (mask per channel, as
    ours), forward and backward through autograd,
  - `dropblock bench --device cuda`, forward and backward,
on the ResNet-50 stage shapes (k = 7) and the PP-YOLO shapes (k = 3), in f32 and
bf16, drop_prob 0.1; then a 3D video and a 1D sequence shape beside the 2D shape of
the same element count and seed density, with torchvision's drop_block3d and
miguelvr's DropBlock3D on the 3D one. Then torch.compile'd torchvision (Inductor's fused Triton
kernels) on COMPILED_SHAPES in bf16: each shape is compiled and warmed up first, and
the compile time is reported apart from, never inside, the timed figures. Prints one markdown table (also written to --out). Bytes are
the floor: x read once and y written once. Run from the GPU bundle, where the
`dropblock` binary sits beside this file.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import torch

import peer_ops

SHAPES = [
    ((256, 256, 56, 56), 7),
    ((256, 512, 28, 28), 7),
    ((256, 1024, 14, 14), 7),
    ((256, 2048, 7, 7), 7),
    ((24, 256, 76, 76), 3),
    ((24, 512, 38, 38), 3),
    ((24, 1024, 19, 19), 3),
]
# Issue 21's 3D (video) and 1D (sequence) shapes, each after the 2D shape of the same
# element count and paper γ within 5% (docs/PERF.md, "1D and 3D"): dropblock's
# rank ratio, and the 3D peers (torchvision's drop_block3d, miguelvr's DropBlock3D).
ND_SHAPES = [
    ((8, 256, 112, 112), 9),
    ((8, 256, 16, 28, 28), 5),
    ((64, 512, 64, 64), 4),
    ((64, 512, 4096), 15),
]
# A subset: each shape costs a compilation of the forward and of the backward.
COMPILED_SHAPES = [((256, 1024, 14, 14), 7), ((256, 2048, 7, 7), 7), ((24, 256, 76, 76), 3)]
HERE = os.path.dirname(os.path.abspath(__file__))


def median_ms(fn, iters, prepare=None):
    """Median CUDA-event time of fn(); prepare() runs untimed before each call."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = []
    for i in range(iters + 3):
        if prepare:
            prepare()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def inputs(shape, iters):
    """For f32 and bf16: (dtype name, a random input, the floor's bytes, copy GB/s)."""
    for dtype, tdtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(shape, device="cuda", dtype=tdtype)
        y = torch.empty_like(x)
        nbytes = 2 * x.numel() * x.element_size()
        copy_gbps = nbytes / median_ms(lambda: y.copy_(x), iters) / 1e6
        del y
        yield dtype, x, nbytes, copy_gbps


def peer_times(op, x, k, iters):
    """(forward ms, backward ms) of op(x, 0.1, k), backward through autograd."""
    fwd = median_ms(lambda: op(x, 0.1, k), iters)
    xg = x.detach().clone().requires_grad_(True)
    g = torch.randn_like(x)
    held = {}

    def prepare():
        # No gradient to accumulate into: the timed backward writes x's gradient
        # afresh, as dropblock's does, not adding to the last call's.
        xg.grad = None
        held["y"] = op(xg, 0.1, k)

    bwd = median_ms(lambda: held["y"].backward(g), iters, prepare)
    return fwd, bwd


def compiled_times(op, x, k, iters):
    """(compile s, forward ms, backward ms) of a torch.compile'd op: the first
    forward and backward compile, and a few more calls settle, all untimed."""
    t0 = time.perf_counter()
    xg = x.detach().clone().requires_grad_(True)
    for _ in range(3):
        op(x, 0.1, k)
        op(xg, 0.1, k).backward(torch.ones_like(x))
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    fwd, bwd = peer_times(op, x, k, iters)
    return compile_s, fwd, bwd


class Report:
    """The tables, printed row by row and written whole to `out` after each row, so
    a run cut off by a time limit keeps what it measured."""

    def __init__(self, out):
        self.out, self.lines, self.failures = out, [], []

    def add(self, *rows):
        self.lines += rows
        print("\n".join(rows), flush=True)
        if self.out:
            with open(self.out + ".tmp", "w") as f:
                f.write("\n".join(self.lines) + "\n")
            os.replace(self.out + ".tmp", self.out)


def ours(shape, k, dtype, backward, iters, report):
    """dropblock bench's median ms, or None (the failure reported) when it fails."""
    cmd = [os.path.join(HERE, "dropblock"), "bench", "--device", "cuda", "--shape", ",".join(map(str, shape)),
           "--block", str(k), "--drop-prob", "0.1", "--dtype", dtype, "--iters", str(iters)]
    if backward:
        cmd.append("--backward")
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        run = subprocess.CompletedProcess(cmd, 124, "", "timed out after 60 s")
    found = re.search(r"median_ms=([0-9.]+)", run.stdout)
    if run.returncode or not found:
        report.failures.append(" ".join(cmd[1:]))
        why = " ".join(run.stderr.split())[-300:]
        report.add(f"FAILED (exit {run.returncode}): {' '.join(cmd[1:])}: {why}")
        return None
    return float(found.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--out")
    args = ap.parse_args()
    tv_op, timm_op = peer_ops.torchvision_op(), peer_ops.timm_op()
    dev = torch.cuda.get_device_properties(0)
    report = Report(args.out)
    report.add(
        f"device: {dev.name}, {dev.multi_processor_count} SMs; {peer_ops.versions()}; drop_prob 0.1; "
        f"median of {args.iters}",
        "",
        "| shape | k | dtype | pass | copy GB/s | dropblock ms | GB/s | % of copy | torchvision ms | timm ms "
        "| × torchvision | × timm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    )
    for shape, k in SHAPES:
        for dtype, x, nbytes, copy_gbps in inputs(shape, args.iters):
            tv, tm = peer_times(tv_op, x, k, args.iters), peer_times(timm_op, x, k, args.iters)
            for i, pass_name in enumerate(("forward", "backward")):
                ms = ours(shape, k, dtype, pass_name == "backward", args.iters, report)
                if ms is None:
                    continue
                gbps = nbytes / ms / 1e6
                report.add(f"| {'x'.join(map(str, shape))} | {k} | {dtype} | {pass_name} | {copy_gbps:.0f} | "
                           f"{ms:.4f} | {gbps:.0f} | {100 * gbps / copy_gbps:.1f} | {tv[i]:.4f} | {tm[i]:.4f} | "
                           f"{tv[i] / ms:.1f} | {tm[i] / ms:.1f} |")
            del x
            torch.cuda.empty_cache()
    compiled_table(args, report)
    nd_table(args, report)
    return 1 if report.failures else 0


def nd_table(args, report):
    """1D and 3D against the 2D shape of the same size, and the 3D peers; bf16 and f32."""
    report.add("", "1D and 3D (issue 21) beside 2D of the same element count and seed density; 3D peers:", "",
               "| shape | k | dtype | pass | copy GB/s | dropblock ms | % of copy | torchvision 3d ms | miguelvr 3d ms "
               "| × torchvision | × miguelvr |", "|---|---|---|---|---|---|---|---|---|---|---|")
    tv3, mv3 = peer_ops.torchvision_3d_op(), peer_ops.miguelvr_3d_op()
    for shape, k in ND_SHAPES:
        for dtype, x, nbytes, copy_gbps in inputs(shape, args.iters):
            peers = [None, None]
            if len(shape) == 5:
                peers = [peer_times(tv3, x, k, args.iters), peer_times(mv3, x, k, args.iters)]
            for i, pass_name in enumerate(("forward", "backward")):
                ms = ours(shape, k, dtype, pass_name == "backward", args.iters, report)
                if ms is None:
                    continue
                pct = 100 * nbytes / ms / 1e6 / copy_gbps
                cells = [f"{p[i]:.4f}" if p else "-" for p in peers] + [f"{p[i] / ms:.1f}" if p else "-" for p in peers]
                report.add(f"| {'x'.join(map(str, shape))} | {k} | {dtype} | {pass_name} | {copy_gbps:.0f} | "
                           f"{ms:.4f} | {pct:.1f} | " + " | ".join(cells) + " |")
            del x
            torch.cuda.empty_cache()


def compiled_table(args, report):
    """The compiled peer, bf16, against dropblock; a failure is reported, not fatal."""
    report.add("", "torch.compile(torchvision.ops.drop_block2d), bf16, compiled and warmed up before timing:", "",
               "| shape | k | pass | compile s | compiled ms | dropblock ms | × compiled |",
               "|---|---|---|---|---|---|---|")
    try:
        op = peer_ops.torchvision_compiled_op()
    except Exception as e:  # an old torch, or no Triton: say so in the table
        report.add(f"torch.compile unavailable: {type(e).__name__}: {e}")
        return
    for shape, k in COMPILED_SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        try:
            compile_s, *peer = compiled_times(op, x, k, args.iters)
        except Exception as e:
            report.add(f"| {'x'.join(map(str, shape))} | {k} | - | failed: {type(e).__name__}: {e} | | | |")
            continue
        for i, pass_name in enumerate(("forward", "backward")):
            ms = ours(shape, k, "bf16", pass_name == "backward", args.iters, report)
            if ms is None:
                continue
            report.add(f"| {'x'.join(map(str, shape))} | {k} | {pass_name} | {compile_s:.1f} | {peer[i]:.4f} | "
                       f"{ms:.4f} | {peer[i] / ms:.1f} |")
        del x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
