"""``ddetr video``: file mode counts/sizes/JSONL, CLI, clean SIGINT, MJPEG stream reconnect and flat
memory on loopback (tracking: test_track.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import supervision as sv
import torch
from typer.testing import CliRunner

from ddetr_cli.cli.main import app
from ddetr_cli.data import synth
from ddetr_cli.data.sources import SourceError
from ddetr_cli.engine.video import FrameBuffer, VideoWriter, parse_source, run_video
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.deformable_detr import DeformableDETR
from ddetr_cli.weights.load import save_model

NAMES = ["circle", "square", "triangle", "cross", "ring"]


class StubDetector:
    """Fast stand-in for ``Detector``: one box per frame, and remembers each frame's mean value
    (the stream test encodes which segment a frame came from in its brightness)."""

    labels = LabelTable.from_names(NAMES)

    def __init__(self) -> None:
        self.means: list[float] = []
        self.batches: list[int] = []

    def predict_arrays(self, images: Sequence[np.ndarray], conf: float = 0.3, max_det: int = 100,
                       classes: Sequence[int] | None = None) -> list[sv.Detections]:
        self.batches.append(len(images))
        out = []
        for im in images:
            self.means.append(float(im.mean()))
            h, w = im.shape[:2]
            out.append(sv.Detections(xyxy=np.array([[w * 0.1, h * 0.1, w * 0.5, h * 0.5]], np.float32),
                                     confidence=np.array([0.9], np.float32), class_id=np.array([1])))
        return out


def count_frames(path: Path) -> tuple[int, int, int, str]:
    """Decode a video to the end with PyAV -> (frames, width, height, codec name)."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        n = sum(1 for _ in c.decode(st))
        return n, st.codec_context.width, st.codec_context.height, st.codec_context.name


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # on 2 shared cores, two OpenMP threads that spin-wait on each other run the tiny model ~8x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("clip") / "shapes.mp4"
    truth = synth.make_clip(path, frames=24, size=(160, 120), fps=12, seed=3)
    return path, truth


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=5, class_names=NAMES, backbone_depth=18, d_model=64, nheads=4, enc_layers=1,
                      dec_layers=1, dim_feedforward=128, num_queries=20)
    return save_model(DeformableDETR(cfg), tmp_path_factory.mktemp("model") / "tiny.safetensors")


# -- units --------------------------------------------------------------------------------------


def test_parse_source(clip: tuple[Path, list[dict]]) -> None:
    assert parse_source("cam1").target == 1 and parse_source("cam1").kind == "webcam"
    assert parse_source("0").kind == "webcam" and parse_source(2).name == "cam2"
    for url in ("rtsp://10.0.0.2:554/live", "rtmp://host/app/key", "http://127.0.0.1:8080/video.mjpg", "https://x/y"):
        assert parse_source(url).kind == "stream" and parse_source(url).live
    spec = parse_source(str(clip[0]))
    assert spec.kind == "file" and not spec.live and spec.name == "shapes"
    with pytest.raises(SourceError, match="no such video file"):
        parse_source("missing.mp4")


def test_frame_buffer_latest_drops_stale_and_fifo_keeps_all() -> None:
    latest = FrameBuffer(latest=True)
    for i in range(5):
        assert latest.put(i)
    assert latest.get(timeout=0.1) == 4 and latest.dropped == 4
    fifo = FrameBuffer(size=2)
    assert fifo.put(1) and fifo.put(2)
    threading.Timer(0.2, fifo.get).start()  # frees a slot so the blocked put can go on
    t = time.monotonic()
    assert fifo.put(3) and time.monotonic() - t > 0.1  # back-pressure, nothing lost
    fifo.close()
    assert [fifo.get(), fifo.get()] == [2, 3] and fifo.get() is None and not fifo.put(4)


def test_writer_h264_pads_odd_sizes_and_mp4v_fallback(tmp_path: Path) -> None:
    for codec, expect in (("auto", ("h264", 64, 48)), ("mp4v", ("mpeg4", 64, 48))):
        w = VideoWriter(tmp_path / f"odd_{codec}.mp4", 63, 47, 10, codec=codec)
        for i in range(5):
            w.write(np.full((47, 63, 3), i * 40, np.uint8))
        w.close()
        w.close()  # idempotent
        n, width, height, name = count_frames(w.path)
        assert (n, name, width, height) == (5, *expect)


def test_writer_live_pts_gaps_keep_real_time_length(tmp_path: Path) -> None:
    w = VideoWriter(tmp_path / "live.mp4", 64, 48, 25, live=True)
    for i, pts in enumerate([0, 1, 2, 5, 6, 10, 20, 30, 49]):  # dropped frames leave gaps
        w.write(np.full((48, 64, 3), i * 20, np.uint8), pts)
    w.close()
    with av.open(str(w.path)) as c:
        times = [float(f.time) for f in c.decode(video=0)]
        assert c.duration / 1e6 == pytest.approx(50 / 25, abs=0.05)
    assert times == pytest.approx([p / 25 for p in (0, 1, 2, 5, 6, 10, 20, 30, 49)])


# -- file mode ----------------------------------------------------------------------------------


def test_file_mode_python_api(clip: tuple[Path, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    path, truth = clip
    det = StubDetector()
    res = run_video(det, path, tmp_path, batch=5, save=True, save_json=True, track=True, show=True, handle_signals=False)
    assert res.stopped == "end" and res.frames == len(truth) == res.read and res.dropped == 0
    assert max(det.batches) == 5 and sum(det.batches) == len(truth)  # consecutive frames were batched
    n, w, h, codec = count_frames(Path(res.outputs["video"]))
    assert (n, w, h, codec) == (len(truth), 160, 120, "h264")
    cap = cv2.VideoCapture(res.outputs["video"])
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(12, abs=0.01)
    with av.open(res.outputs["video"]) as c:
        assert c.duration / 1e6 == pytest.approx(len(truth) / 12, abs=0.1)  # players show the right length
    recs = read_jsonl(Path(res.outputs["jsonl"]))
    assert [r["frame"] for r in recs] == list(range(len(truth)))
    assert recs[3]["time"] == pytest.approx(3 / 12, abs=1e-3) and (recs[0]["width"], recs[0]["height"]) == (160, 120)
    d = recs[-1]["detections"][0]
    assert d["class"] == "square" and d["label"] == 1 and d["score"] == pytest.approx(0.9) and len(d["box"]) == 4
    assert isinstance(d["track_id"], int)  # same box every frame -> a confirmed track
    assert any("--show" in m and "display" in m for m in res.messages)  # headless: told once, run went on


def test_vid_stride(clip: tuple[Path, list[dict]], tmp_path: Path) -> None:
    res = run_video(StubDetector(), clip[0], tmp_path, stride=5, save_json=True, handle_signals=False)
    assert [r["frame"] for r in read_jsonl(Path(res.outputs["jsonl"]))] == list(range(0, 24, 5))


def test_sigterm_stops_cleanly_python_api(tmp_path: Path) -> None:
    src = tmp_path / "long.mp4"
    synth.make_clip(src, frames=120, size=(96, 64), fps=25, seed=2)
    before = signal.getsignal(signal.SIGTERM)

    def on_progress(s) -> None:
        if s.frames == 10:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the pipeline in this (main) thread

    res = run_video(StubDetector(), src, tmp_path / "run", save=True, save_json=True, on_progress=on_progress)
    assert res.stopped == "signal" and 10 <= res.frames < 120 and any("SIGTERM" in m for m in res.messages)
    assert count_frames(Path(res.outputs["video"]))[0] == res.frames == len(read_jsonl(Path(res.outputs["jsonl"])))
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_cli_file_with_tiny_model(clip: tuple[Path, list[dict]], tiny_model: Path, tmp_path: Path) -> None:
    path, truth = clip
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["video", str(path), "--model", str(tiny_model), "--imgsz", "64", "--batch", "4",
                                 "--conf", "0.0", "--max-det", "3", "--track", "--save", "--save-json", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["frames"] == len(truth) and summary["codec"] == "h264"
    assert count_frames(out / "shapes.mp4")[:3] == (len(truth), 160, 120)
    recs = read_jsonl(out / "shapes.jsonl")
    # conf 0 -> the max-det boxes, less the duplicates --track suppresses (a query's box once per class)
    assert len(recs) == len(truth) and all(1 <= len(r["detections"]) <= 3 for r in recs)
    assert all("track_events" in r for r in recs)
    assert {d["class"] for r in recs for d in r["detections"]} <= set(NAMES)


def test_cli_bad_source_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ddetr_cli.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ddetr", "video", "does-not-exist.mp4"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "no such video file" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_sigint_leaves_playable_file(tiny_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "long.mp4"
    synth.make_clip(src, frames=300, size=(160, 120), fps=25, seed=1)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ddetr_cli", "video", str(src), "--model", str(tiny_model), "--imgsz", "64",
                             "--save", "--save-json", "--out", str(out), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    jsonl = out / "long.jsonl"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "frames processed" in err and "long.mp4" in err
    recs = read_jsonl(jsonl)
    n, w, h, _ = count_frames(out / "long.mp4")
    assert 0 < n == len(recs) < 300 and (w, h) == (160, 120)
    cap = cv2.VideoCapture(str(out / "long.mp4"))
    assert sum(1 for _ in iter(lambda: cap.read()[0], False)) == n


# -- streams ------------------------------------------------------------------------------------


class MjpegServer:
    """MJPEG over HTTP on 127.0.0.1. Connection k streams ``segments[k]`` = (gray value, frames)
    then hangs up; for ``gap_s`` after a hang-up, and after the last segment, requests get 503."""

    def __init__(self, segments: list[tuple[int, int]], gap_s: float = 0.8, size: tuple[int, int] = (64, 48),
                 fps: float = 600.0) -> None:
        self.segments, self.gap_s, self.period = list(segments), gap_s, 1.0 / fps
        self.jpegs = [cv2.imencode(".jpg", np.full((size[1], size[0], 3), v, np.uint8))[1].tobytes() for v, _ in segments]
        self.served = 0
        self.down_until = 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    k = server.served
                    up = k < len(server.segments) and time.monotonic() >= server.down_until
                    if up:
                        server.served += 1
                if not up:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                jpg, n = server.jpegs[k], server.segments[k][1]
                part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n"
                try:
                    for _ in range(n):
                        self.wfile.write(part)
                        time.sleep(server.period)  # paced like a (very fast) camera
                except OSError:
                    pass
                with server.lock:
                    server.down_until = time.monotonic() + server.gap_s

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cam.mjpg"

    def __enter__(self) -> "MjpegServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS read from /proc")
def test_stream_reconnects_and_memory_stays_flat(tmp_path: Path) -> None:
    det = StubDetector()
    rss: dict[str, float] = {}

    def on_progress(s) -> None:
        if s.frames == 300:
            rss["start"] = rss_mb()

    # segment 1 (dark) is cut, the server is down for a while, segment 2 (bright, long) follows,
    # then the server stays down and the run gives up after reconnect_timeout
    with MjpegServer([(40, 200), (200, 4000)], fps=600) as server:
        res = run_video(det, server.url, tmp_path, save=True, save_json=True, track=True, reconnect_timeout=2.0,
                        backoff=0.1, read_timeout=2.0, on_progress=on_progress, handle_signals=False)
    rss["end"] = rss_mb()
    assert res.reconnects == 1 and res.stopped == "error" and "gave up reconnecting" in (res.error or "")
    assert sum(1 for m in res.messages if "stream lost" in m) == 2  # each drop logged once, not per retry
    dark, bright = sum(m < 100 for m in det.means), sum(m > 100 for m in det.means)
    assert dark > 0 and bright > 0, (dark, bright)  # frames from before and after the cut
    assert res.read >= 4000 and res.frames >= 500 and res.frames + res.dropped == res.read
    recs = read_jsonl(Path(res.outputs["jsonl"]))
    assert len(recs) == res.frames and all("wall" in r for r in recs[:3])
    assert count_frames(Path(res.outputs["video"]))[0] == res.frames  # one file across the reconnect
    assert rss["end"] - rss["start"] < 40, rss


def test_stream_without_reconnect_ends_at_hangup(tmp_path: Path) -> None:
    with MjpegServer([(90, 60)], fps=300) as server:
        res = run_video(StubDetector(), server.url, tmp_path, save_json=True, reconnect=False, handle_signals=False)
    assert res.stopped == "end" and res.error is None and res.reconnects == 0 and 0 < res.frames <= res.read <= 60
    assert any("stream ended" in m for m in res.messages)
