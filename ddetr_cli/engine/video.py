"""``ddetr video``: detection (and tracking) on video files, webcams and network streams.

Three stages run at once and hand frames over through small bounded buffers, so memory stays
flat however long the video or stream runs::

    reader thread      decode (+ reconnect)      -> FrameBuffer (FIFO for files, newest-only for live)
    inference thread   batch -> Detector         -> FrameBuffer (FIFO)
    calling thread     track -> annotate -> encode / JSONL / window

Python API::

    det = Detector.from_pretrained("demo")
    res = run_video(det, "clip.mp4", out_dir=Path("runs/video/exp"), save=True, save_json=True, track=True)
    print(res.frames, res.dropped, res.fps, res.outputs)
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Protocol

# FFmpeg inside OpenCV logs every HTTP hiccup on stderr; our own messages say it once, clearly
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import supervision as sv  # noqa: E402

from ddetr_cli.data.sequence import ImageSequence  # noqa: E402
from ddetr_cli.data.sources import SourceError  # noqa: E402
from ddetr_cli.engine.draw import Annotator  # noqa: E402
from ddetr_cli.engine.stop import StopRequest  # noqa: E402
from ddetr_cli.engine.track import Fill, Tracker, TrackSettings, settings_for, tracked_output  # noqa: E402
from ddetr_cli.formats.labels import LabelTable  # noqa: E402
from ddetr_cli.formats.masks import instance_polygons, require_masks  # noqa: E402
from ddetr_cli.formats.mot import TrackFileError, is_mot_sequence  # noqa: E402
from ddetr_cli.formats.panoptic import PanopticWriter  # noqa: E402

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
MAX_BACKOFF_S = 30.0


class DetectorLike(Protocol):
    """What the pipeline needs from a detector (``Detector`` or a test stub)."""

    labels: LabelTable

    def predict_arrays(self, images: Sequence[np.ndarray], conf: float = ..., max_det: int = ...,
                       classes: Sequence[int] | None = ...) -> list[sv.Detections]: ...


# -- sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source argument: ``target`` is a path/URL, or an int for a webcam."""

    target: str | int
    kind: str  # "file" | "sequence" (MOTChallenge image folder) | "webcam" | "stream"
    name: str  # stem for output files

    @property
    def live(self) -> bool:
        return self.kind not in ("file", "sequence")


def parse_source(source: str | int | Path) -> SourceSpec:
    """``cam0`` / ``0`` -> webcam 0; ``rtsp://``, ``rtmp://``, ``http(s)://`` ... -> stream; a
    folder with ``seqinfo.ini`` -> a MOTChallenge image sequence; else a file.

    Raises SourceError for a path that does not exist.
    """
    if isinstance(source, int):
        return SourceSpec(source, "webcam", f"cam{source}")
    s = str(source).strip()
    m = re.fullmatch(r"(?:cam|webcam)?(\d+)", s, flags=re.IGNORECASE)
    if m and not Path(s).exists():
        return SourceSpec(int(m.group(1)), "webcam", f"cam{m.group(1)}")
    scheme = urllib.parse.urlparse(s).scheme.lower()
    if scheme in STREAM_SCHEMES:
        u = urllib.parse.urlparse(s)
        stem = Path(u.path).stem or u.hostname or "stream"
        return SourceSpec(s, "stream", re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "stream")
    p = Path(s).expanduser()
    if p.is_dir():
        if not is_mot_sequence(p):
            raise SourceError(f"{s}: a folder source must be a MOTChallenge sequence (seqinfo.ini + img1/000001.jpg ...)")
        return SourceSpec(str(p), "sequence", p.resolve().name)
    if not p.is_file():
        raise SourceError(f"{s}: no such video file (webcams are cam0, cam1, ...; streams need rtsp://, rtmp:// or http(s)://)")
    return SourceSpec(str(p), "file", p.stem)


def open_capture(spec: SourceSpec, timeout_s: float = 10.0, quiet: bool = True) -> cv2.VideoCapture | ImageSequence:
    """Open ``spec`` with OpenCV; a capture that is not opened is returned as is (caller checks).

    Network streams get open/read timeouts so a dead server fails a read instead of hanging.
    ``quiet`` silences OpenCV's own log lines ("[ERROR:0@5.6] ... Camera index out of range"):
    the caller reports a failed open in one line of its own.
    """
    if quiet:
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        try:
            return open_capture(spec, timeout_s, quiet=False)
        finally:
            cv2.utils.logging.setLogLevel(level)
    if spec.kind == "sequence":
        try:
            return ImageSequence(str(spec.target))
        except TrackFileError as e:
            raise SourceError(str(e)) from None
    if spec.kind == "webcam":
        cap = cv2.VideoCapture(int(spec.target))
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # a deep driver queue is latency in latest-frame mode
        return cap
    ms = int(max(timeout_s, 0.5) * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms] if spec.kind == "stream" else []
    return cv2.VideoCapture(str(spec.target), cv2.CAP_FFMPEG, params)


@dataclass
class VideoInfo:
    """Geometry and timing of an opened source; ``frames`` is None for live sources."""

    width: int
    height: int
    fps: float
    frames: int | None


def probe(cap: cv2.VideoCapture | ImageSequence, spec: SourceSpec) -> VideoInfo:
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    # streams report 0, NaN or the 90 kHz clock; a sane default keeps writer and tracker working
    if not (math.isfinite(fps) and 1.0 <= fps <= 240.0):
        fps = 30.0
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    return VideoInfo(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), fps,
                     n if not spec.live and n > 0 else None)


@dataclass
class Frame:
    """One decoded frame: ``image`` (H, W, 3) uint8 BGR, ``index`` in the source (gaps = skipped or
    dropped frames), ``time`` seconds from the start of the source, ``wall`` capture epoch time."""

    index: int
    time: float
    wall: float
    image: np.ndarray


class FrameBuffer:
    """Bounded hand-off between two threads.

    ``latest=False``: FIFO of ``size`` items, ``put`` blocks while full (back-pressure, no loss).
    ``latest=True``: one slot; a new item replaces an unconsumed one, counted in ``dropped``, so
    the consumer always gets the newest frame and never falls behind real time.
    ``close`` ends the stream: ``put`` then refuses, ``get`` drains what is left, then returns None.
    """

    def __init__(self, size: int = 4, latest: bool = False) -> None:
        self.size = 1 if latest else max(1, size)
        self.latest = latest
        self.dropped = 0
        self.closed = False
        self._items: deque = deque()
        self._cond = threading.Condition()

    def put(self, item: Any) -> bool:
        with self._cond:
            if self.latest and self._items and not self.closed:
                self._items.popleft()
                self.dropped += 1
            while len(self._items) >= self.size and not self.closed:
                self._cond.wait(0.1)
            if self.closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Any | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items and not self.closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left if left is not None else 0.5)
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class FrameReader(threading.Thread):
    """Decode frames into ``buffer``; for live sources reconnect with exponential backoff.

    Files: every ``stride``-th frame (the others are grabbed, not decoded). A read failure on a
    live source is logged once, then the source is reopened after 0.5, 1, 2, ... s (capped at
    ``MAX_BACKOFF_S``) until it delivers a frame or ``reconnect_timeout`` seconds have passed;
    then ``failure`` holds the reason and the buffer is closed.
    """

    def __init__(self, spec: SourceSpec, cap: cv2.VideoCapture, info: VideoInfo, buffer: FrameBuffer, stop: threading.Event, *,
                 stride: int = 1, reconnect: bool = True, reconnect_timeout: float = 120.0, backoff: float = 0.5,
                 read_timeout: float = 10.0, log: Callable[[str], None] = lambda m: None) -> None:
        super().__init__(name="ddetr-video-reader", daemon=True)
        self.spec, self.cap, self.info, self.buffer, self.stop = spec, cap, info, buffer, stop
        self.stride, self.reconnect, self.reconnect_timeout = max(1, stride), reconnect, reconnect_timeout
        self.backoff, self.read_timeout, self.log = backoff, read_timeout, log
        self.read = 0  # frames decoded
        self.reconnects = 0
        self.failure: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # surfaced by the pipeline, not lost in a thread
            self.error = e
        finally:
            self.buffer.close()
            self.cap.release()

    def _loop(self) -> None:
        index = -1
        start = time.time()
        while not self.stop.is_set():
            index += 1
            if not self.spec.live and index % self.stride:
                if not self.cap.grab():
                    return
                continue
            ok, img = self.cap.read()
            if not ok or img is None:
                if not self.spec.live:
                    return  # end of file
                if not self.reconnect:
                    self.log(f"stream ended at frame {index} (--no-reconnect)")
                    return
                if not self._reconnect(index):
                    return
                ok, img = self.cap.retrieve()  # _reconnect grabbed the first frame to prove the link
                if not ok or img is None:
                    continue
            now = time.time()
            t = index / self.info.fps if not self.spec.live else now - start
            self.read += 1
            if not self.buffer.put(Frame(index, t, now, img)):
                return

    def _reconnect(self, index: int) -> bool:
        """Reopen until a frame can be read; True on success. Logs the drop once."""
        t0 = time.monotonic()
        self.log(f"stream lost at frame {index}; reconnecting (giving up after {self.reconnect_timeout:g} s)")
        delay = self.backoff
        while not self.stop.is_set():
            left = self.reconnect_timeout - (time.monotonic() - t0)
            if left <= 0:
                break
            self.cap.release()
            if self.stop.wait(min(delay, left)):
                return False
            left = self.reconnect_timeout - (time.monotonic() - t0)
            cap = open_capture(self.spec, timeout_s=min(self.read_timeout, max(left, 0.5)), quiet=True)
            if cap.isOpened() and cap.grab():
                self.cap = cap
                self.reconnects += 1
                self.log(f"reconnected after {time.monotonic() - t0:.1f} s")
                return True
            cap.release()
            delay = min(delay * 2, MAX_BACKOFF_S)
        if not self.stop.is_set():
            self.failure = f"{self.spec.target}: gave up reconnecting after {time.monotonic() - t0:.0f} s (--reconnect-timeout)"
        return False


# -- outputs ------------------------------------------------------------------------------------


class VideoWriter:
    """Annotated frames -> MP4: H.264 (libx264, yuv420p, plays in browsers) through PyAV, else
    OpenCV's mp4v. Frames are (H, W, 3) uint8 BGR of the size given here (others are resized).

    ``pts`` (in 1/fps units) lets live sources keep real-time spacing when frames were dropped;
    by default frames are consecutive. 4:2:0 video cannot have odd sides (mp4v silently crops
    them), so an odd-sized source is padded by one edge pixel to even sides and stays H.264.
    """

    def __init__(self, path: Path, width: int, height: int, fps: float, codec: str = "auto", live: bool = False) -> None:
        self.path, self.src_size = Path(path), (width, height)
        self.width, self.height = width + width % 2, height + height % 2
        self.rate = Fraction(fps).limit_denominator(1001)
        self.frames = 0
        self._last_pts = -1
        self.live = live
        self._av: Any = None
        self._cv: cv2.VideoWriter | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if codec in ("auto", "h264"):
            try:
                self._open_av()
                self.codec = "h264"
                return
            except Exception:
                if codec == "h264":
                    raise
                self._av = None
                self.path.unlink(missing_ok=True)
        self._cv = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), float(self.rate), (self.width, self.height))
        if not self._cv.isOpened():
            raise OSError(f"cannot open a video writer for {self.path}")
        self.codec = "mp4v"

    def _open_av(self) -> None:
        import av

        container = av.open(str(self.path), mode="w")
        try:
            stream = container.add_stream("libx264", rate=self.rate)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            # veryfast: encoding must stay cheap next to the model; crf 23 is x264's default quality
            stream.options = {"crf": "23", "preset": "veryfast"}
            if self.live:
                # no B-frames/lookahead: frames leave the encoder at once, and with pts gaps the
                # MP4 duration comes out right (B-frame reordering made it short)
                stream.options["tune"] = "zerolatency"
        except Exception:
            container.close()
            raise
        self._av = (container, stream)

    def write(self, image_bgr: np.ndarray, pts: int | None = None) -> None:
        sw, sh = self.src_size
        if image_bgr.shape[:2] != (sh, sw):  # a reconnected stream may come back at another size
            image_bgr = cv2.resize(image_bgr, (sw, sh), interpolation=cv2.INTER_AREA)
        if (sw, sh) != (self.width, self.height):
            image_bgr = cv2.copyMakeBorder(image_bgr, 0, self.height - sh, 0, self.width - sw, cv2.BORDER_REPLICATE)
        pts = self._last_pts + 1 if pts is None else max(int(pts), self._last_pts + 1)
        self._last_pts = pts
        self.frames += 1
        if self._cv is not None:
            self._cv.write(image_bgr)
            return
        import av

        container, stream = self._av
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(image_bgr), format="bgr24")
        vf.pts, vf.time_base = pts, 1 / self.rate
        for packet in stream.encode(vf):
            container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and finalise the file (moov atom); safe to call twice."""
        if self._av is not None:
            container, stream = self._av
            self._av = None
            try:
                for packet in stream.encode():
                    container.mux(packet)
            finally:
                container.close()
        if self._cv is not None:
            self._cv.release()
            self._cv = None


def detections_to_records(dets: sv.Detections, labels: LabelTable,
                          polygons: Sequence[list[list[float]]] | None = None) -> list[dict]:
    """sv.Detections (N boxes) -> N dicts: box xyxy px, score, label (the model's index),
    category_id and class (as predictions.json writes them), track_id (or None); with ``polygons``
    (per detection, ``masks.instance_polygons``) also ``segmentation``."""
    out = []
    tids = dets.tracker_id
    for i in range(len(dets)):
        label = int(dets.class_id[i]) if dets.class_id is not None else -1
        cat = labels.get(label)
        tid = int(tids[i]) if tids is not None and int(tids[i]) >= 0 else None
        score = float(dets.confidence[i]) if dets.confidence is not None else 1.0
        rec = {"box": [round(float(v), 2) for v in dets.xyxy[i]], "score": round(score, 5), "label": label,
               "category_id": cat.id if cat else None, "class": labels.name(label), "track_id": tid}
        if polygons is not None:
            rec["segmentation"] = polygons[i]
        out.append(rec)
    return out


def add_fills(pending: Sequence[tuple[int, dict]], fills: Sequence[Fill], labels: LabelTable, conf: float) -> int:
    """Add the tracker's interpolated boxes to the waiting JSON line records of their steps
    (``pending``: (tracker step, record)); returns how many were added. Each is marked
    ``"interpolated": true`` and has no score: it is the track's estimate, not a detection. A
    fill that ``replaces`` a weak box takes its id: the box stays as an untracked detection if it
    scores at least ``conf`` (what is drawn and saved), else it goes (it was kept for the track)."""
    by_step = {st: rec for st, rec in pending}
    n = 0
    for f in fills:
        rec = by_step.get(f.step)
        if rec is None:  # cannot happen while the writer honours Tracker.hold_from
            continue
        if f.replaces:
            dets = []
            for d in rec["detections"]:
                if d.get("track_id") == f.track_id and not d.get("interpolated"):
                    if d["score"] < conf:
                        continue
                    d = dict(d, track_id=None)
                dets.append(d)
            rec["detections"] = dets
        cat = labels.get(f.class_id)
        rec["detections"].append({"box": [round(float(v), 2) for v in f.xyxy], "score": None, "label": f.class_id,
                                  "category_id": cat.id if cat else None, "class": labels.name(f.class_id),
                                  "track_id": f.track_id, "interpolated": True})
        n += 1
    return n


class JsonlWriter:
    """One JSON object per processed frame, flushed per line so a killed run leaves valid lines."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] | None = open(self.path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        assert self._f is not None
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class DisplayUnavailable(RuntimeError):
    """``--show`` cannot open a window (no display, headless OpenCV)."""


def gui_problem() -> str | None:
    """Why OpenCV cannot open a window here, or None if it probably can.

    Checked before any cv2 window call: OpenCV's Qt backend aborts the whole process (not a
    Python exception) when it cannot reach a display.
    """
    m = re.search(r"GUI:\s*(\S+)", cv2.getBuildInformation())
    if m is None or m.group(1).upper() == "NONE":
        return "OpenCV has no GUI support here (opencv-python-headless?); install opencv-python to use --show"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display available (DISPLAY is not set)"
    return None


class Display:
    """A window showing annotated frames with the current FPS; ``q`` or Esc asks to quit."""

    def __init__(self, title: str = "ddetr") -> None:
        problem = gui_problem()
        if problem:
            raise DisplayUnavailable(problem)
        self.title = title
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error as e:
            raise DisplayUnavailable(f"cannot open a window ({str(e).strip().splitlines()[-1]})") from None

    def show(self, image_bgr: np.ndarray, fps: float) -> bool:
        """Show one frame; False when the user pressed q/Esc or closed the window."""
        img = image_bgr.copy()
        cv2.putText(img, f"{fps:.1f} FPS", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, f"{fps:.1f} FPS", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.imshow(self.title, img)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            return False
        try:
            return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1
        except cv2.error:
            return False

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass


# -- tracking -----------------------------------------------------------------------------------


def draw(annotator: Annotator, image_bgr: np.ndarray, dets: sv.Detections) -> np.ndarray:
    """Annotated copy (masks too when the detections carry them); unconfirmed tracks (id -1)
    are drawn without an id."""
    if dets.tracker_id is None or len(dets) == 0 or (dets.tracker_id >= 0).all():
        return annotator.draw(image_bgr, dets)
    plain = sv.Detections(xyxy=dets.xyxy, confidence=dets.confidence, class_id=dets.class_id)
    labels = [f"#{int(t)} {s}" if t >= 0 else s for t, s in zip(dets.tracker_id, annotator.labels(plain))]
    return annotator.draw(image_bgr, dets, labels=labels)


# -- pipeline -----------------------------------------------------------------------------------


@dataclass
class VideoStats:
    """Live counters; ``dropped`` = stale frames replaced before the model saw them."""

    source: str
    live: bool
    total: int | None  # frames expected (files), else None
    read: int = 0
    frames: int = 0  # processed (inferred + written)
    dropped: int = 0
    reconnects: int = 0
    detections: int = 0
    seconds: float = 0.0
    fps: float = 0.0  # recent processing rate

    @property
    def mean_fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass
class VideoResult:
    """Summary of a run. ``stopped``: end | signal | quit | error."""

    source: str
    out_dir: Path
    frames: int = 0
    read: int = 0
    dropped: int = 0
    reconnects: int = 0
    detections: int = 0
    tracks: int = 0
    interpolated: int = 0  # --track: boxes filled into short gaps of tracks (JSON lines only; not detections)
    seconds: float = 0.0
    width: int = 0
    height: int = 0
    source_fps: float = 0.0
    codec: str | None = None
    stopped: str = "end"
    error: str | None = None
    messages: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("out_dir",)}
        d.update(out_dir=str(self.out_dir), fps=round(self.fps, 3), seconds=round(self.seconds, 3))
        return d


@dataclass
class FrameResult:
    """What ``on_frame`` receives per processed frame: the source frame and its detections."""

    frame: Frame
    detections: sv.Detections
    annotated: np.ndarray | None


class VideoPipeline:
    """Decode, infer and write concurrently; see the module docstring. One use per instance."""

    def __init__(
        self,
        detector: DetectorLike,
        source: str | int | Path,
        out_dir: Path | None = None,
        *,
        conf: float = 0.3,
        max_det: int = 100,
        classes: Sequence[int] | None = None,
        batch: int | None = None,
        stride: int = 1,
        latest: bool | None = None,
        track: bool = False,
        track_settings: TrackSettings | None = None,
        masks: bool = False,
        panoptic: bool = False,
        panoptic_conf: float = 0.85,
        show: bool = False,
        save: bool = False,
        save_json: bool = False,
        reconnect: bool = True,
        reconnect_timeout: float = 120.0,
        backoff: float = 0.5,
        read_timeout: float = 10.0,
        codec: str = "auto",
        log: Callable[[str], None] | None = None,
        on_progress: Callable[[VideoStats], None] | None = None,
        on_frame: Callable[[FrameResult], None] | None = None,
    ) -> None:
        self.spec = parse_source(source)
        if (save or save_json) and out_dir is None:
            raise ValueError("out_dir is needed to save outputs")
        if masks or panoptic:
            # masks are drawn whenever present; --masks adds polygons to the JSON lines
            require_masks(detector, flag="--masks" if masks else "--panoptic")
        if panoptic and out_dir is None:
            raise ValueError("out_dir is needed to save the panoptic segment maps")
        self.masks, self.panoptic, self.panoptic_conf = masks, panoptic, panoptic_conf
        self.detector, self.out_dir = detector, Path(out_dir) if out_dir is not None else None
        self.conf, self.max_det, self.classes = conf, max_det, classes
        self.batch, self.stride = (None if batch is None else max(1, batch)), max(1, stride)
        # latest-frame mode only makes sense for live sources: files must not lose frames
        self.latest = self.spec.live if latest is None else (latest and self.spec.live)
        if self.latest:
            self.batch = 1  # batching would mean waiting for stale frames
        self.track, self.show, self.save, self.save_json, self.codec = track, show, save, save_json, codec
        # None: the model card's thresholds (``ModelConfig.track_high/low``), else the defaults
        self.track_settings = track_settings or settings_for(getattr(detector, "cfg", None))
        # the tracker wants every detection down to its low threshold; ``conf`` still decides
        # which untracked ones are drawn and saved (``track.tracked_output``)
        self.infer_conf = min(conf, self.track_settings.low) if track else conf
        self.reconnect, self.reconnect_timeout, self.backoff, self.read_timeout = reconnect, reconnect_timeout, backoff, read_timeout
        self._log_fn, self.on_progress, self.on_frame = log, on_progress, on_frame
        self.stop_event = threading.Event()
        self.stop_reason: str | None = None
        self.messages: list[str] = []

    def log(self, msg: str) -> None:
        self.messages.append(msg)
        if self._log_fn is not None:
            self._log_fn(msg)

    def stop(self, reason: str = "signal") -> None:
        """Stop reading; frames already decoded are still inferred and written. Thread-safe."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_event.set()
        if hasattr(self, "_frames"):
            self._frames.close()

    def _infer_loop(self, out: FrameBuffer) -> None:
        """Inference thread: frames -> (frame, detections), in order, in batches for files."""
        try:
            while True:
                first = self._frames.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < self.batch:
                    nxt = self._frames.get()
                    if nxt is None:
                        break
                    batch.append(nxt)
                rgb = [cv2.cvtColor(f.image, cv2.COLOR_BGR2RGB) for f in batch]
                if self.panoptic:
                    dets, segs = self.detector.predict_panoptic(rgb, self.infer_conf, self.max_det, self.classes, self.panoptic_conf)
                else:
                    dets = self.detector.predict_arrays(rgb, conf=self.infer_conf, max_det=self.max_det, classes=self.classes)
                    segs = [None] * len(dets)
                for f, d, seg in zip(batch, dets, segs):
                    if not out.put((f, d, seg)):
                        return
        except BaseException as e:
            self._infer_error = e
            self.stop("error")
        finally:
            out.close()

    def _install_signals(self) -> Callable[[], None]:
        def requested(signum: int) -> None:
            self.log(f"{signal.Signals(signum).name}: finishing frames in flight (again to abort)")
            self.stop("signal")

        stop = StopRequest(on_request=requested)  # a second signal aborts (files are still closed in finally)
        stop.__enter__()
        return stop.__exit__

    def run(self, handle_signals: bool = True) -> VideoResult:
        """Process the whole source (or until stopped); always closes outputs."""
        spec = self.spec
        cap = open_capture(spec, timeout_s=self.read_timeout)
        if not cap.isOpened():
            cap.release()
            what = {"file": "cannot decode video file", "sequence": "cannot read the sequence", "webcam": "cannot open webcam",
                    "stream": "cannot open stream"}[spec.kind]
            raise SourceError(f"{spec.target}: {what}")
        info = probe(cap, spec)
        if self.batch is None:  # files: as many frames per pass as the detector batches by default
            auto = getattr(self.detector, "auto_batch", None)  # a test stub may batch nothing
            self.batch = auto(self.detector.input_shape(info.height, info.width)) if auto and info.height else 1
        res = VideoResult(source=str(spec.target), out_dir=self.out_dir or Path("."), width=info.width, height=info.height,
                          source_fps=info.fps, messages=self.messages)
        out_fps = info.fps / self.stride
        total = math.ceil(info.frames / self.stride) if info.frames else None
        stats = VideoStats(source=str(spec.target), live=spec.live, total=total)

        self._frames = FrameBuffer(size=max(2 * self.batch, 4), latest=self.latest)
        # live: a short results queue, or annotated frames would wait there and lag real time
        results = FrameBuffer(size=2 if self.latest else 2 * self.batch + 2)
        self._infer_error: BaseException | None = None
        reader = FrameReader(spec, cap, info, self._frames, self.stop_event, stride=self.stride, reconnect=self.reconnect,
                             reconnect_timeout=self.reconnect_timeout, backoff=self.backoff, read_timeout=self.read_timeout,
                             log=self.log)
        infer = threading.Thread(target=self._infer_loop, args=(results,), name="ddetr-video-infer", daemon=True)

        labels = self.detector.labels
        annotator = Annotator(labels)
        tracker = Tracker(fps=out_fps, settings=self.track_settings, frame_size=(info.width, info.height)) if self.track else None
        last_frame: dict[int, int] = {}  # track id -> last frame index it was output in
        # tracking: JSON lines wait, as (tracker step, record), until no fill can reach them (at
        # most TrackSettings.fill_s of frames), and the newest one frame more, for the ids that end
        # with the stream
        pending: deque[tuple[int, dict]] = deque()
        step = -1
        interpolated = 0
        display: Display | None = None
        if self.show:
            try:
                display = Display(f"ddetr - {spec.name}")
            except DisplayUnavailable as e:
                self.log(f"--show: {e}; continuing without a window")
        writer: VideoWriter | None = None
        jsonl = JsonlWriter(self.out_dir / f"{spec.name}.jsonl") if self.save_json and self.out_dir else None
        if jsonl:
            res.outputs["jsonl"] = str(jsonl.path)
        pan = PanopticWriter(labels, self.out_dir / f"{spec.name}_panoptic") if self.panoptic and self.out_dir else None
        if pan is not None:
            res.outputs["panoptic"] = str(self.out_dir / f"{spec.name}_panoptic.json")

        restore = self._install_signals() if handle_signals else (lambda: None)
        t0 = time.perf_counter()
        recent: deque[float] = deque(maxlen=30)
        first_wall: float | None = None
        try:
            reader.start()
            infer.start()
            while True:
                item = results.get()
                if item is None:
                    break
                frame, dets, seg = item
                events: list[dict] = []
                if tracker is not None:
                    dets = tracked_output(tracker.update(dets, timestamp=frame.time, frame=frame.image), self.conf)
                    step += 1
                    ev = tracker.events
                    events = [{"id": i, "event": "start"} for i in ev.started]
                    events += [{"id": i, "event": "end", "last_frame": last_frame[i]} for i in ev.ended if i in last_frame]
                    last_frame.update((int(t), frame.index) for t in dets.tracker_id if t >= 0)
                annotated = None
                if self.save or display or self.on_frame:
                    annotated = annotator.draw_panoptic(frame.image, seg) if seg is not None else draw(annotator, frame.image, dets)
                if pan is not None and seg is not None:
                    h, w = frame.image.shape[:2]
                    pan.add(f"{frame.index:06d}.jpg", w, h, seg, image_id=frame.index + 1)
                    pan.images[-1].update(frame=frame.index, time=round(frame.time, 4))
                if self.save and self.out_dir is not None and annotated is not None:
                    if writer is None:
                        h, w = annotated.shape[:2]
                        writer = VideoWriter(self.out_dir / f"{spec.name}.mp4", w, h, out_fps, codec=self.codec, live=spec.live)
                        res.codec = writer.codec
                        res.outputs["video"] = str(writer.path)
                        first_wall = frame.wall
                    # live: place frames at their capture time so dropped frames keep real-time length
                    pts = round((frame.wall - first_wall) * out_fps) if spec.live and first_wall is not None else None
                    writer.write(annotated, pts)
                if jsonl is not None:
                    h, w = frame.image.shape[:2]
                    rec: dict[str, Any] = {"frame": frame.index, "time": round(frame.time, 4), "width": w, "height": h,
                                           "detections": detections_to_records(
                                               dets, labels, instance_polygons(dets) if self.masks else None)}
                    if spec.live:
                        rec["wall"] = round(frame.wall, 3)
                    if tracker is None:
                        jsonl.write(rec)
                    else:
                        rec["track_events"] = events
                        interpolated += add_fills(pending, tracker.fills, labels, self.conf)
                        pending.append((step, rec))
                        hold = tracker.hold_from()
                        while len(pending) > 1 and pending[0][0] < hold:
                            jsonl.write(pending.popleft()[1])
                now = time.perf_counter()
                recent.append(now)
                stats.frames += 1
                stats.detections += len(dets)
                stats.read, stats.dropped, stats.reconnects = reader.read, self._frames.dropped, reader.reconnects
                stats.seconds = now - t0
                stats.fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
                if display is not None and not display.show(annotated, stats.fps):
                    self.stop("quit")
                if self.on_frame is not None:
                    self.on_frame(FrameResult(frame, dets, annotated))
                if self.on_progress is not None:
                    self.on_progress(stats)
        except BaseException:
            self.stop("error")
            raise
        finally:
            restore()
            self._frames.close()
            results.close()
            try:
                if writer is not None:
                    writer.close()
            finally:
                if jsonl is not None:
                    if pending and tracker is not None:
                        pending[-1][1]["track_events"] += [{"id": i, "event": "end", "last_frame": last_frame[i]}
                                                           for i in tracker.finish() if i in last_frame]
                    while pending:
                        jsonl.write(pending.popleft()[1])
                    jsonl.close()
                if pan is not None:
                    pan.write(Path(res.outputs["panoptic"]), {"description": "ddetr video panoptic segment maps",
                                                              "source": str(spec.target), "panoptic_conf": self.panoptic_conf})
                if display is not None:
                    display.close()
            infer.join(timeout=5)
            # a reader blocked in a network read returns within read_timeout; don't wait longer
            reader.join(timeout=self.read_timeout + 1)

        if self._infer_error is not None:
            raise self._infer_error
        if reader.error is not None:
            raise reader.error
        res.frames, res.read, res.dropped, res.reconnects = stats.frames, reader.read, self._frames.dropped, reader.reconnects
        res.detections, res.tracks, res.interpolated = stats.detections, len(last_frame), interpolated
        res.seconds = time.perf_counter() - t0
        res.stopped = self.stop_reason or "end"
        if reader.failure and self.stop_reason is None:
            res.stopped, res.error = "error", reader.failure
        return res


def run_video(detector: DetectorLike, source: str | int | Path, out_dir: Path | None = None, **kw: Any) -> VideoResult:
    """Run the video pipeline on ``source``; see ``VideoPipeline`` for the options."""
    handle_signals = kw.pop("handle_signals", True)
    return VideoPipeline(detector, source, out_dir, **kw).run(handle_signals=handle_signals)
