"""End-to-end Deformable DETR forward: this project vs transformers, same weights, same input.

    python benchmarks/bench_model.py                 # CPU, 800x1066, multi-scale R50
    python benchmarks/bench_model.py --device cuda --dtype bf16 --batch 4

Prints one markdown table (median ms per image, images/s, speed-up vs transformers), measured
in one process, interleaved, on the same inputs and thread count. On CPU the rows are ddetr in
float32 and in bfloat16 (``--half``: run where the CPU has AMX / AVX512-BF16, or with
``--force-bf16`` where it would be emulated), transformers in float32, and the compute floor: the
model's GEMM + convolution FLOPs at this CPU's large-sgemm rate, timed in the same interleaved
loop (so a busy machine slows floor and model alike); with the bfloat16 row, a bfloat16 floor (the
same FLOPs at a large bfloat16 matmul's rate), against which that row's share is given. The header
names the CPU and its flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# The ddetr command's process settings (OpenMP wait policy, huge pages, malloc keeping freed
# memory: ddetr_cli/ops/process.py) are made before torch loads, as the CLI makes them, for every
# row alike; --plain-process leaves them out (torch's and glibc's defaults).
if "--plain-process" not in sys.argv:
    from ddetr_cli.ops.process import configure

    configure()

import torch  # noqa: E402

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


SGEMM_N = 4096


def model_gflop(model, x: torch.Tensor, mask: torch.Tensor) -> float:
    """GFLOP of the (transformers) model's matmuls and convolutions on this input."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # grad mode: the counter's module tracker needs autograd nodes
        model(pixel_values=x, pixel_mask=(~mask).long())
    return counter.get_total_flops() / 1e9


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
    ap.add_argument("--plain-process", action="store_true",
                    help="leave out the ddetr command's process settings (huge pages, malloc, OpenMP wait policy)")
    ap.add_argument("--force-bf16", action="store_true",
                    help="CPU: time the bfloat16 row even where the CPU has no native bfloat16 (emulated, slow)")
    args = ap.parse_args()

    import tempfile

    from ddetr_cli.models.fusion import to_reduced_precision
    from ddetr_cli.ops.cpu import bf16_support, cpu_info
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
    def load_ours():
        if hf is not None:
            with tempfile.TemporaryDirectory() as d:
                save_hub(hf, d)
                return load_model(d)
        from ddetr_cli.models.build import build_model
        from ddetr_cli.models.config import ModelConfig

        return build_model(ModelConfig.from_variant(args.variant, num_classes=91))

    dev = args.device
    cpu = not dev.startswith("cuda")
    ours = load_ours().optimize_for_inference()  # what Detector does
    ours.to(dev).eval()
    if hf is not None:
        hf.to(dev).eval()
    x = torch.randn(args.batch, 3, args.height, args.width, device=dev)
    mask = torch.zeros(args.batch, args.height, args.width, dtype=torch.bool, device=dev)
    # CUDA: --dtype selects autocast for both models; CPU: float32 rows plus a bfloat16 row
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ac = torch.autocast(dev.split(":")[0], dtype=dtype, enabled=args.dtype != "fp32" and not cpu)

    @torch.inference_mode()
    def run_ours():
        with ac:
            return ours(x, mask)

    @torch.inference_mode()
    def run_hf():
        with ac:
            return hf(pixel_values=x, pixel_mask=(~mask).long())

    op = backend_info()["backend"] + " op"
    fns = {f"ddetr float32 ({op})" if cpu else f"ddetr {args.dtype} ({op})": run_ours}
    bf16_ok, bf16_why = bf16_support()
    bf16_note = None
    if cpu and (bf16_ok or args.force_bf16):
        ours16 = load_ours().optimize_for_inference().eval()  # what Detector(half=True) does on CPU
        to_reduced_precision(ours16, torch.bfloat16, list(ours16.FLOAT32_HEADS))
        x16 = x.to(torch.bfloat16)
        fns[f"ddetr bfloat16 ({bf16_why if bf16_ok else 'emulated: ' + bf16_why})"] = torch.inference_mode()(
            lambda: ours16(x16, mask))
    elif cpu:
        bf16_note = f"bfloat16 row not run: {bf16_why} (`ddetr detect --half` refuses here; --force-bf16 times it)"
    if not args.no_hf:
        fns["transformers 4.x" + (" float32" if cpu else "")] = run_hf
    gflop = None
    if cpu and not args.no_hf:
        gflop = model_gflop(hf, x, mask)
        a, b = torch.randn(SGEMM_N, SGEMM_N), torch.randn(SGEMM_N, SGEMM_N)
        fns["sgemm"] = lambda: a @ b
        if any("bfloat16" in name for name in fns):  # the bfloat16 row's floor: the same FLOPs at bf16 GEMM speed
            a16, b16 = a.bfloat16(), b.bfloat16()
            fns["bf16 gemm"] = lambda: a16 @ b16
    times = time_interleaved(fns, dev, args.repeats)
    sgemm = times.pop("sgemm", None)
    bgemm = times.pop("bf16 gemm", None)
    rows = list(times.items())
    if not args.no_hf:
        with torch.inference_mode():
            out_a, out_b = run_ours(), run_hf()
        diff = (out_a["logits"].float() - out_b.logits.float()).abs().max().item()
    base = next((t for name, t in rows if name.startswith("transformers")), None)
    if cpu:
        info = cpu_info()
        dev_name = f"{info.name}; flags {', '.join(info.flags) or 'no AVX2'}; {torch.get_num_threads()} threads"
    else:
        dev_name = torch.cuda.get_device_name(0)
    from ddetr_cli.ops.process import describe

    print(f"\nEnd-to-end {args.variant} R50, {args.batch}x3x{args.height}x{args.width}, {dev} ({dev_name}), "
          f"torch {torch.__version__}; process: {'; '.join(f'{k} {v}' for k, v in describe().items())}\n")
    print("| implementation | ms / batch | images / s | speed-up vs transformers | share of the floor |")
    print("|---|---:|---:|---:|---:|")
    floor = gflop / (2 * SGEMM_N**3 / sgemm / 1e9) if gflop is not None and sgemm else None
    peak16 = 2 * SGEMM_N**3 / bgemm / 1e9 if bgemm else None
    floor16 = gflop / peak16 if gflop is not None and peak16 else None
    for name, t in rows:
        ratio = f"{base / t:.2f}x" if base else "-"
        # each row against the floor of its own precision
        own_floor = floor16 if "bfloat16" in name else floor
        share = f"{own_floor / t:.0%}" if own_floor else "-"
        print(f"| {name} | {t * 1000:.0f} | {args.batch / t:.2f} | {ratio} | {share} |")
    if floor is not None:
        peak = 2 * SGEMM_N**3 / sgemm / 1e9
        print(f"| compute floor (float32): {gflop:.0f} GFLOP of GEMM + conv at {peak:.0f} GFLOP/s "
              f"(this CPU's {SGEMM_N}^3 sgemm, timed in the same loop) | {floor * 1000:.0f} | {args.batch / floor:.2f} | "
              f"{base / floor:.2f}x | 100% |")
    if floor16 is not None:
        print(f"| compute floor (bfloat16): the same GFLOP at {peak16:.0f} GFLOP/s ({SGEMM_N}^3 bfloat16 matmul, same loop) "
              f"| {floor16 * 1000:.0f} | {args.batch / floor16:.2f} | {base / floor16:.2f}x | 100% |")
    if bf16_note:
        print(f"| ddetr bfloat16 | not run | - | - | - |\n\n{bf16_note}")
    if not args.no_hf:
        print(f"\nmax |logits diff| ours (float32) vs transformers: {diff:.2e}")


if __name__ == "__main__":
    main()
