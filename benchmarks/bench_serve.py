"""`ddetr serve` (the Label Studio ML backend) under load: requests/s and latency vs the model alone.

    python benchmarks/bench_serve.py                    # demo model, 120 requests per row
    python benchmarks/bench_serve.py --requests 40 --model demo --device cpu

Starts `ddetr serve` as a process on 127.0.0.1 and sends `/predict` requests (the example
images as local paths, one or several tasks per request) from 1 or 4 concurrent clients; then
runs the model alone (first, in this process, in a worker thread as the server does) on the same
decoded images, one image per call. Prints one
markdown table (requests/s, tasks/s, p50/p95 latency, tasks/s relative to the model alone) and the
server's resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IMAGES = sorted((ROOT / "examples" / "images").glob("*.jpg"))


def start(model: str, device: str, batch: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "ddetr_cli", "serve", "--model", model, "--device", device, "--port", "0",
                             "--batch", str(batch), "--json", "-q"], stdout=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600:
        try:
            return proc, json.loads("".join(lines))["url"]
        except ValueError:
            if proc.poll() is not None:
                raise SystemExit(f"ddetr serve exited with {proc.returncode}") from None
            time.sleep(0.2)
    raise SystemExit("ddetr serve did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(url: str, clients: int, per_request: int, requests: int) -> tuple[float, list[float]]:
    """-> (wall seconds, each request's latency in seconds)."""
    def one(i: int) -> float:
        tasks = [{"id": i * per_request + k, "data": {"image": str(IMAGES[(i * per_request + k) % len(IMAGES)])}}
                 for k in range(per_request)]
        req = urllib.request.Request(url + "/predict", data=json.dumps({"tasks": tasks}).encode(),
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            body = json.loads(r.read())
        assert r.status == 200 and len(body["results"]) == per_request and all(body["results"])
        return time.perf_counter() - t

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(3 * len(IMAGES))))  # warm-up: every image shape, three times
        t = time.perf_counter()
        lat = list(pool.map(one, range(requests)))
        return time.perf_counter() - t, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=120, help="requests per row")
    ap.add_argument("--batch", type=int, default=4, help="ddetr serve --batch")
    args = ap.parse_args()

    import torch

    from ddetr_cli.data.images import read_image
    from ddetr_cli.engine.predictor import Detector

    # the model alone first, in one worker thread as the server's model runs (on a shared VM the
    # main thread's OpenMP team, spin-waiting against other jobs, can be several times slower),
    # each image shape warmed up three times (the first calls of a shape are slower)
    det = Detector.from_pretrained(args.model, device=args.device)
    arrays = [read_image(p) for p in IMAGES]
    n_alone = args.requests

    def model_alone() -> float:
        for a in arrays * 3:
            det.predict_arrays([a])
        t = time.perf_counter()
        for i in range(n_alone):
            det.predict_arrays([arrays[i % len(arrays)]])
        return n_alone / (time.perf_counter() - t)

    with ThreadPoolExecutor(1) as pool:
        alone = pool.submit(model_alone).result()
    imgsz = det.imgsz

    rows = []
    proc, url = start(args.model, args.device, args.batch)
    try:
        for clients, per_request in [(1, 1), (4, 1), (4, 4)]:
            n = args.requests if per_request == 1 else max(1, args.requests // per_request)
            seconds, lat = run(url, clients, per_request, n)
            rows.append((clients, per_request, n, n / seconds, n * per_request / seconds,
                         1000 * float(np.percentile(lat, 50)), 1000 * float(np.percentile(lat, 95))))
        rss = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)

    dev = torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() else \
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n`ddetr serve --model {args.model} --batch {args.batch}` on the {len(IMAGES)} example images "
          f"(320x240 to 800x600, imgsz {imgsz}), {dev}, torch {torch.__version__}\n")
    print("| clients | tasks / request | requests | requests/s | tasks/s | p50 ms | p95 ms | tasks/s vs model alone |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients, per, n, rps, tps, p50, p95 in rows:
        print(f"| {clients} | {per} | {n} | {rps:.2f} | {tps:.2f} | {p50:.0f} | {p95:.0f} | {tps / alone:.0%} |")
    print(f"| model alone (one image per call, no HTTP) | | {n_alone} | | {alone:.2f} | | | 100% |")
    print(f"\nserver RSS after the runs: {rss:.0f} MB")


if __name__ == "__main__":
    main()
