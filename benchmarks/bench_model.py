"""End-to-end Deformable DETR forward: this project vs transformers, same weights, same input.

    python benchmarks/bench_model.py                 # CPU, 800x1066, multi-scale R50
    python benchmarks/bench_model.py --device cuda --dtype bf16 --batch 4

Prints one markdown table (median ms per image, images/s, speed-up vs transformers), measured
in one process, interleaved, on the same inputs and thread count.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device: str, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns (so drift in a
    shared machine's speed reaches every row alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compute_floor(model, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(GFLOP of the model's matmuls and convolutions, GFLOP/s of a large sgemm here): no fp32
    implementation of the same network runs faster than their ratio on this CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # grad mode: the counter's module tracker needs autograd nodes
        model(pixel_values=x, pixel_mask=(~mask).long())
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    seconds = time_interleaved({"sgemm": lambda: a @ b}, "cpu", 5)["sgemm"]  # median of 5
    return counter.get_total_flops() / 1e9, 2 * 4096**3 / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1066)
    ap.add_argument("--variant", default="multi-scale")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers row")
    args = ap.parse_args()

    import tempfile

    from ddetr_cli.ops.msda import backend_info
    from ddetr_cli.weights.load import load_model

    hf = None
    if not args.no_hf:
        try:
            from hf_reference import make_hf_model, save_hub

            hf = make_hf_model(args.variant, small=False, num_labels=91)
        except Exception as e:  # e.g. a machine whose transformers has no (or another) DeformableDetr
            print(f"transformers' model unavailable ({type(e).__name__}: {e}); timing ddetr alone")
            args.no_hf = True
    if hf is not None:
        with tempfile.TemporaryDirectory() as d:
            save_hub(hf, d)
            ours = load_model(d)
    else:
        from ddetr_cli.models.build import build_model
        from ddetr_cli.models.config import ModelConfig

        ours = build_model(ModelConfig.from_variant(args.variant, num_classes=91))
    ours.optimize_for_inference()  # what Detector does
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = args.device
    if hf is not None:
        hf.to(dev).eval()
    ours.to(dev).eval()
    x = torch.randn(args.batch, 3, args.height, args.width, device=dev)
    mask = torch.zeros(args.batch, args.height, args.width, dtype=torch.bool, device=dev)
    ac = torch.autocast(dev.split(":")[0], dtype=dtype, enabled=args.dtype != "fp32")

    @torch.inference_mode()
    def run_ours():
        with ac:
            return ours(x, mask)

    @torch.inference_mode()
    def run_hf():
        with ac:
            return hf(pixel_values=x, pixel_mask=(~mask).long())

    ours_label = "ddetr (" + backend_info()["backend"] + " op)"
    fns = {ours_label: run_ours} if args.no_hf else {ours_label: run_ours, "transformers 4.x": run_hf}
    rows = list(time_interleaved(fns, dev, args.repeats).items())
    if not args.no_hf:
        with torch.inference_mode():
            a, b = run_ours(), run_hf()
        diff = (a["logits"].float() - b.logits.float()).abs().max().item()
    floor = None
    if not dev.startswith("cuda") and args.dtype == "fp32" and not args.no_hf:
        floor = compute_floor(hf, x, mask)
    base = dict(rows).get("transformers 4.x")
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    dev_name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else cpu
    print(f"\nEnd-to-end {args.variant} R50, {args.batch}x3x{args.height}x{args.width}, {args.dtype}, {dev} ({dev_name}), torch "
          f"{torch.__version__}\n")
    print("| implementation | ms / batch | images / s | speed-up vs transformers |")
    print("|---|---:|---:|---:|")
    for name, t in rows:
        ratio = f"{base / t:.2f}x" if base else "-"
        print(f"| {name} | {t * 1000:.0f} | {args.batch / t:.2f} | {ratio} |")
    if floor is not None:
        gflop, peak = floor
        t = gflop / peak
        print(f"| compute floor: {gflop:.0f} GFLOP of GEMM + conv at {peak:.0f} GFLOP/s (this CPU's 4096^3 sgemm) "
              f"| {t * 1000:.0f} | {args.batch / t:.2f} | {base / t:.2f}x |")
    if not args.no_hf:
        print(f"\nmax |logits diff| ours vs transformers: {diff:.2e}")


if __name__ == "__main__":
    main()
