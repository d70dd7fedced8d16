"""``ddetr serve`` as a process under load: 200 ``/predict`` requests from 4 concurrent clients on
the example images all answered, the server's resident memory flat after warm-up (within 50 MB),
a request with a bad image answered for its other tasks, and SIGTERM during a request: the
request completes, then the server exits 0. Speed is benchmarks/bench_serve.py's job.
"""

from __future__ import annotations

import http.server
import json
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = sorted((ROOT / "examples" / "images").glob("*.jpg"))
REQUESTS, CLIENTS, WARMUP = 200, 4, 40
RSS_SLACK_MB = 50

pytestmark = pytest.mark.slow


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/predict", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_load_memory_bad_image_and_graceful_stop(start_serve, tmp_path):
    proc, url, log = start_serve("--model", "demo", "--device", "cpu", "-q")

    def one(i: int) -> tuple[int, int]:
        status, body = post(url, {"tasks": [{"id": i, "data": {"image": str(IMAGES[i % len(IMAGES)])}}]})
        [pred] = body["results"]
        return status, len(pred["result"])

    with ThreadPoolExecutor(CLIENTS) as pool:
        warm = list(pool.map(one, range(WARMUP)))
        base = rss_mb(proc.pid)
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(rss_mb(proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        try:
            rest = list(pool.map(one, range(WARMUP, REQUESTS)))
        finally:
            done.set()
            sampler.join()
        seconds = time.perf_counter() - t0
    answers = warm + rest
    assert len(answers) == REQUESTS and all(status == 200 for status, _ in answers)
    assert all(n > 0 for _, n in answers)  # every example image has detections
    end = rss_mb(proc.pid)
    print(f"\n{REQUESTS - WARMUP} requests in {seconds:.1f} s ({(REQUESTS - WARMUP) / seconds:.1f}/s, {CLIENTS} clients); "
          f"RSS after warm-up {base:.0f} MB, peak {max(peak):.0f} MB, end {end:.0f} MB")
    assert max(peak) - base <= RSS_SLACK_MB, (base, max(peak))

    # a bad image in a batch: that task gets no prediction, the others theirs, status 200
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(IMAGES[0].read_bytes()[:200])
    status, body = post(url, {"tasks": [{"id": 1, "data": {"image": str(IMAGES[0])}}, {"id": 2, "data": {"image": str(bad)}},
                                        {"id": 3, "data": {"image": str(IMAGES[1])}}]})
    assert status == 200
    first, missing, last = body["results"]
    assert missing == [] and first["result"] and last["result"]
    assert "task 2: no prediction" in log.read_text()

    # SIGTERM while a request is in flight (its image comes from a server that answers slowly)
    asked = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            asked.set()
            time.sleep(2.0)
            data = IMAGES[2].read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    try:
        tasks = [{"id": 1, "data": {"image": f"http://127.0.0.1:{slow.server_address[1]}/x.jpg"}},
                 {"id": 2, "data": {"image": str(IMAGES[3])}}]
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(post, url, {"tasks": tasks})
            assert asked.wait(60)
            proc.send_signal(signal.SIGTERM)
            status, body = fut.result(timeout=120)
        assert status == 200 and all(r["result"] for r in body["results"])
        assert proc.wait(60) == 0
    finally:
        slow.shutdown()
        slow.server_close()
    assert "ddetr serve: stopped" in log.read_text()
