"""Benchmark multi-scale deformable attention: compiled op vs grid_sample fallback vs transformers.

Encoder shape of an 800x1066 image: levels 100x134, 50x67, 25x34, 13x17 (S = Lq = 17821), N=1,
8 heads, 32 channels per head, 4 points per level. Sampling locations are encoder-like by default:
each query's reference point is its own pixel centre and the points lie a few pixels around it
(offsets ~ N(0, 2 px)), as in a trained Deformable DETR encoder; ``--locations uniform`` spreads
them over the whole image instead (worst case for caches).

All rows run in one process on the same inputs with the same thread count; repeats are
interleaved (row A, row B, ..., row A, ...) so that background load hits every row alike. The
table reports the median and the minimum of the repeats and the speed-up of the median against
the grid_sample fallback.

    python benchmarks/bench_op.py [--repeats 5] [--device cpu|cuda] [--locations encoder|uniform]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ddetr_cli.ops import msda as op

LEVELS = [(100, 134), (50, 67), (25, 34), (13, 17)]


def make_inputs(device, dtype, locations, heads=8, channels=32, points=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    num_levels = len(LEVELS)
    value = torch.randn(1, s, heads, channels, generator=g)
    if locations == "encoder":
        refs = []
        for h, w in LEVELS:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        ref = torch.cat(refs).view(1, s, 1, 1, 1, 2)
        wh = spatial_shapes.flip(-1).view(1, 1, 1, num_levels, 1, 2).float()
        loc = ref + torch.randn(1, s, heads, num_levels, points, 2, generator=g) * 2 / wh
    else:
        loc = torch.rand(1, s, heads, num_levels, points, 2, generator=g)
    attn = torch.randn(1, s, heads, num_levels * points, generator=g).softmax(-1)
    attn = attn.view(1, s, heads, num_levels, points)
    value, loc, attn = (t.to(device=device, dtype=dtype) for t in (value, loc, attn))
    return value, spatial_shapes.to(device), level_start_index.to(device), loc, attn


def transformers_fn():
    """transformers' pure-PyTorch implementation (an nn.Module in 4.57), or None."""
    try:
        from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
    except ImportError:
        return None
    module = MultiScaleDeformableAttention()

    def run(value, spatial_shapes, level_start_index, loc, attn):
        return module(value, spatial_shapes, LEVELS, level_start_index, loc, attn, 64)

    return run


def timed(fn, inputs, backward, device):
    value, spatial_shapes, level_start_index, loc, attn = inputs
    if backward:
        value, loc, attn = (t.detach().requires_grad_() for t in (value, loc, attn))
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(value, spatial_shapes, level_start_index, loc, attn)
    if backward:
        out.backward(torch.ones_like(out))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (after one warm-up)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--locations", default="encoder", choices=["encoder", "uniform"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible")

    info = op.backend_info()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"locations {args.locations}")
    print(f"backend: {info['backend']} ({info['reason']}), cuda kernels: {info['cuda_kernels']}")

    rows = []  # (label, fn, dtype)
    compiled_ok = info["backend"] == "compiled" and (args.device == "cpu" or info["cuda_kernels"])
    if compiled_ok:
        rows.append(("compiled op fp32", op.ms_deform_attn, torch.float32))
        if args.device == "cuda":
            rows.append(("compiled op bf16", op.ms_deform_attn, torch.bfloat16))
    rows.append(("grid_sample fallback fp32", op.ms_deform_attn_torch, torch.float32))
    if args.device == "cuda":
        rows.append(("grid_sample fallback bf16", op.ms_deform_attn_torch, torch.bfloat16))
    hf = transformers_fn()
    if hf is not None:
        rows.append(("transformers MultiScaleDeformableAttention fp32", hf, torch.float32))
    else:
        print("transformers not installed: its row is skipped")

    inputs = {dt: make_inputs(args.device, dt, args.locations) for dt in {r[2] for r in rows}}
    results = {}
    for backward in (False, True):
        times = {label: [] for label, _, _ in rows}
        for label, fn, dt in rows:  # warm-up (and the first build, if any)
            timed(fn, inputs[dt], backward, args.device)
        for _ in range(args.repeats):
            for label, fn, dt in rows:
                times[label].append(timed(fn, inputs[dt], backward, args.device))
        results[backward] = times

    print()
    print("| implementation | pass | median ms | min ms | speed-up vs fallback |")
    print("|---|---|---:|---:|---:|")
    for backward, times in results.items():
        base_label = "grid_sample fallback fp32"
        base = statistics.median(times[base_label])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"| {label} | {'fwd+bwd' if backward else 'fwd'} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | "
                  f"{base / med:.1f}x |")


if __name__ == "__main__":
    main()
