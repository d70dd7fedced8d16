"""The ``ddetr`` command line: a thin Typer layer over the Python API.

Known failures (bad input, missing weights, unreadable data) print one red line and exit
non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import errno
import inspect
import json
import platform
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ddetr_cli import __version__

app = typer.Typer(
    name="ddetr",
    help="Deformable DETR object detection: detect, video, serve, finetune, eval.\n\n"
    "Examples:\n\n"
    "  ddetr detect photo.jpg --model demo\n\n"
    "  ddetr weights list\n\n"
    "  ddetr info",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
weights_app = typer.Typer(help="Manage named weights (bundled, hub, imported, finetuned).", no_args_is_help=True)
app.add_typer(weights_app, name="weights")

console = Console(stderr=True)
out = Console()


def _print_json(data) -> None:
    """``--json`` output: plain JSON on stdout, never Rich markup or colour (FORCE_COLOR, a
    terminal), so it pipes into ``python -m json.tool`` / ``jq`` as it is."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


class UserError(Exception):
    """A failure the user can fix; shown as one line."""


def _report(as_json: bool, data: dict, text: str) -> None:
    """A command's one-line result: ``data`` as plain JSON with --json, else ``text``."""
    if as_json:
        _print_json(data)
    else:
        out.print(text)


def fail(msg: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _known_errors() -> tuple[type[BaseException], ...]:
    from ddetr_cli.data.images import ImageReadError
    from ddetr_cli.data.sources import SourceError
    from ddetr_cli.engine.detect import DetectStopped
    from ddetr_cli.files import RunFolderError
    from ddetr_cli.weights.load import WeightsError
    from ddetr_cli.weights.store import ModelNotAvailable

    errs: list[type[BaseException]] = [UserError, WeightsError, ModelNotAvailable, SourceError, ImageReadError,
                                       FileNotFoundError, RunFolderError, DetectStopped]
    try:
        from ddetr_cli.data.datasets import DatasetError

        errs.append(DatasetError)
    except ImportError:
        pass
    return tuple(errs)


def _version_cb(value: bool) -> None:
    if value:
        out.print(f"ddetr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_cb, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


# -- info ---------------------------------------------------------------------------------------


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Versions, device, and which deformable-attention backend is in use and why.

    Example: ddetr info --json
    """
    import torch

    from ddetr_cli.models.fusion import fused_cpu_kernels
    from ddetr_cli.ops.cpu import bf16_support, cpu_info
    from ddetr_cli.ops.msda import backend_info
    from ddetr_cli.ops.process import describe as process_settings

    b = backend_info()
    bf16_ok, bf16_why = bf16_support()
    data = {
        "ddetr": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()}, {torch.get_num_threads()} "
                                                                                  f"threads)",
        "msda_backend": b.get("backend"),
        "msda_reason": b.get("reason"),
        "msda_cuda_kernels": b.get("cuda_kernels"),
        "cpu": cpu_info().summary,
        "cpu_threads": torch.get_num_threads(),
        # idle OpenMP threads sleep, huge pages, malloc keeping memory (ddetr_cli/ops/process.py)
        **process_settings(),
        "cpu_fused_kernels": fused_cpu_kernels(),
        # --half on CPU: bfloat16 where the CPU multiplies it natively, refused elsewhere
        "cpu_bf16": bf16_ok,
        "cpu_bf16_reason": bf16_why,
    }
    if as_json:
        _print_json(data)
        return
    t = Table(show_header=False, box=None)
    for k, v in data.items():
        t.add_row(f"[bold]{k}[/]", str(v))
    out.print(t)


# -- detect -------------------------------------------------------------------------------------


def _parse_formats(formats: list[str]) -> list[str]:
    from ddetr_cli.engine.detect import FORMATS

    fmts = []
    for f in formats:
        fmts += [x.strip().lower() for x in f.split(",") if x.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise UserError(f"unknown --format {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    return fmts or ["coco"]


HALF_HELP = "Half precision: fp16/bf16 autocast on GPU; bfloat16 on CPUs with AMX or AVX512-BF16 (see ddetr info)."

THREADS_HELP = "CPU threads for the model (default: one per physical core; fewer leaves cores to other work)."


def _use_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op threads on CPU (None keeps torch's default, every physical core)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _load_detector(model, device: str, half: bool, imgsz, classes=None):
    """Detector plus the label ids ``--classes`` names (None = all); bad values -> UserError."""
    from ddetr_cli.engine.predictor import Detector

    try:
        det = Detector.from_pretrained(model, device=device, half=half, imgsz=imgsz)
    except ValueError as e:
        if isinstance(e, _known_errors()):
            raise
        raise UserError(str(e)) from None
    if not classes:
        return det, None
    try:
        return det, det.class_ids([c for item in classes for c in item.split(",") if c.strip()])
    except ValueError as e:
        raise UserError(str(e)) from None


def _run_dir(out_dir: Path | None, command: str, exist_ok: bool) -> Path:
    """The command's run folder: ``--out`` claimed (see ``files.claim_run_dir``), else the next
    ``runs/<command>/expN``."""
    from ddetr_cli.files import claim_run_dir, next_run_dir

    return claim_run_dir(out_dir, exist_ok) if out_dir is not None else next_run_dir(Path("runs") / command)


def _require_masks(det, model, flag: str = "--masks") -> None:
    from ddetr_cli.formats.masks import MasksUnavailable, require_masks

    try:
        require_masks(det, model, flag)
    except MasksUnavailable as e:
        raise UserError(str(e)) from None


@app.command()
def detect(
    sources: Annotated[list[str], typer.Argument(
            help="Images, folders, quoted globs ('**' ok), .txt lists, http(s) URLs.", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name, hub folder, official .pth or .safetensors. "
                                                                       "Default: the COCO model.")] = None,
    conf: Annotated[float, typer.Option(help="Score threshold.", min=0.0, max=1.0)] = 0.3,
    classes: Annotated[Optional[list[str]], typer.Option("--classes", help="Keep only these classes: names or category ids as in "
                                                                           "predictions.json (repeat or comma-separate).")] = None,
    max_det: Annotated[int, typer.Option("--max-det", help="Most detections per image.", min=1)] = 100,
    imgsz: Annotated[Optional[int], typer.Option(help="Short side the images are resized to (default: the size the model was trained at; "
                                                      "800 for the COCO models).", min=32)] = None,
    batch: Annotated[Optional[int], typer.Option(help="Images per forward pass, padded to the largest. Default: consecutive images "
                                                      "the model sees at one size go together, unpadded (so each gets its own "
                                                      "detections), up to a pixel budget: on CPU 8 at 256x341, one at 800x1066; "
                                                      "on CUDA up to 8.", min=1, show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    half: Annotated[bool, typer.Option(help=HALF_HELP)] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, min=1, show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/detect/expN, never overwritten).")] = None,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Replace the earlier ddetr run in --out (default: a non-empty --out is "
                                                              "refused).")] = False,
    formats: Annotated[list[str], typer.Option("--format", help="coco, yolo, voc, labelstudio (repeat or comma-separate; labelstudio: "
                                                                "labelstudio.json tasks + labelstudio-config.xml). With --masks, yolo "
                                                                "writes segmentation polygons (class x1 y1 x2 y2 ...); voc stays "
                                                                "boxes.")] = ["coco"],  # noqa: B006
    save_images: Annotated[bool, typer.Option("--save-images/--no-save-images", help="Write annotated images.")] = True,
    masks: Annotated[bool, typer.Option("--masks", help="Instance masks as COCO polygons in 'segmentation' (needs a model with a mask "
                                                        "head, e.g. detr-resnet-50-panoptic).")] = False,
    panoptic: Annotated[bool, typer.Option("--panoptic", help="Also a panoptic segmentation per image (every pixel in at most one "
                                                              "thing or stuff segment) in COCO panoptic format: panoptic/<stem>.png + "
                                                              "panoptic.json; annotated images show the segment map. Needs a mask "
                                                              "head.")] = False,
    panoptic_conf: Annotated[float, typer.Option("--panoptic-conf", help="With --panoptic: score a query needs to take part in the "
                                                                         "segment map (the reference's 0.85).", min=0.0,
                                                 max=1.0)] = 0.85,
    save_conf: Annotated[bool, typer.Option("--save-conf", help="YOLO label lines end with the confidence (a sixth column, as "
                                                                "ultralytics' save_conf).")] = False,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    workers: Annotated[int, typer.Option(help="Image-decoding threads.", min=1)] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout (plain JSON).")] = False,
    ls_root: Annotated[Optional[Path], typer.Option("--ls-root", help="labelstudio format: the folder image URLs are relative to (Label "
                                                                      "Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT). Default: the "
                                                                      "current directory.")] = None,
    ls_url_prefix: Annotated[Optional[str], typer.Option("--ls-url-prefix", help="labelstudio format: images are served at this URL + "
                                                                                 "path relative to --ls-root (instead of Label Studio's "
                                                                                 "local files).")] = None,
) -> None:
    """Detect objects in images; write COCO JSON pre-labels (and YOLO/VOC) and annotated images.

    The run folder imports as it is: predictions.json (COCO; also as
    annotations/instances_default.json beside images/, for Datumaro/CVAT), data.yaml +
    labels/ (yolo: ultralytics, supervision), voc/ (Annotations, ImageSets, labelmap.txt).

    Examples:

      ddetr detect examples/images --model demo

      ddetr detect 'photos/**/*.jpg' --conf 0.5 --format coco,yolo --out runs/labels

      ddetr detect list.txt --classes person,car --json

      ddetr detect photos --masks --model detr-resnet-50-panoptic --format coco,yolo

      ddetr detect photos --panoptic --model detr-resnet-50-panoptic

      ddetr detect data/images --format coco,labelstudio --ls-root data
    """
    import functools

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ddetr_cli.engine.detect import run_detect
    from ddetr_cli.formats.labelstudio import ImageURLError, image_url

    fmts = _parse_formats(formats)
    _use_threads(threads)
    if ls_root is not None and not ls_root.is_dir():
        raise UserError(f"--ls-root {ls_root}: no such folder")
    det, class_ids = _load_detector(model, device, half, imgsz, classes)
    if masks or panoptic:
        _require_masks(det, model, "--masks" if masks else "--panoptic")  # before a run folder is made
    run_dir = _run_dir(out_dir, "detect", exist_ok)
    progress = Progress(
        TextColumn("[bold]detect"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=quiet or as_json, transient=False,
    )
    started = [0.0]

    with progress:
        task = progress.add_task("detect", total=None, rate="-")

        def on_total(n: int) -> None:
            import time

            started[0] = time.perf_counter()
            progress.update(task, total=n)

        def on_progress(done: int, total: int) -> None:
            import time

            dt = time.perf_counter() - started[0]
            progress.update(task, completed=done, rate=f"{done / dt:.1f}" if dt > 0 else "-")

        try:
            res = run_detect(
                det, sources, run_dir, conf=conf, max_det=max_det, classes=class_ids, batch=batch,
                formats=fmts, save_images=save_images, masks=masks, panoptic=panoptic, panoptic_conf=panoptic_conf,
                save_conf=save_conf, recursive=recursive, workers=workers,
                progress=on_progress, total_hint=on_total,
                ls_url=functools.partial(image_url, root=ls_root, prefix=ls_url_prefix),
            )
        except ImageURLError as e:
            raise UserError(str(e)) from None
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (engine.stop): exit 130 or 143
            from ddetr_cli.engine.stop import exit_code

            progress.stop()
            console.print(f"[yellow]interrupted[/]: partial results in {run_dir}/predictions.json (marked incomplete)")
            raise typer.Exit(exit_code(e))

    if as_json:
        _print_json(res.to_dict())
    elif not quiet:
        _detect_summary(res)
    if res.images == 0:
        fail(f"no image could be read ({len(res.skipped)} skipped)")


def _detect_summary(res) -> None:
    t = Table(title=f"ddetr detect: {res.images} images, {res.detections} detections", title_justify="left")
    t.add_column("class")
    t.add_column("detections", justify="right")
    for name, n in res.per_class.most_common():
        t.add_row(name, str(n))
    if not res.per_class:
        t.add_row("[dim](none)[/]", "0")
    console.print(t)
    console.print(f"time {res.seconds:.2f} s, {res.throughput:.2f} img/s")
    if res.skipped:
        console.print(f"[yellow]skipped {len(res.skipped)}[/]:")
        for s in res.skipped[:20]:
            console.print(f"  {s['reason']}", highlight=False)
        if len(res.skipped) > 20:
            console.print(f"  ... and {len(res.skipped) - 20} more (see predictions.json info.skipped)")
    for kind, path in res.outputs.items():
        console.print(f"{kind:>13}: {path}", highlight=False)


# -- video --------------------------------------------------------------------------------------

TRACKER_HELP = ("cbiou (default: best on bench_track.py), bytetrack, ocsort, botsort (camera-motion compensation) or sort; "
                "all from the trackers package.")
TRACK_HIGH_HELP = ("Tracking: detections scoring at least this start tracks and are matched first (default: the model card's "
                   "track_high, else 0.5; measured).")
TRACK_LOW_HELP = ("Tracking: detections from this score up only continue tracks; lower ones are ignored (default: the model "
                  "card's track_low, else 0.1; measured).")
TRACK_FILL_DEFAULT = 2.0  # engine.track.TrackSettings.fill_s (measured: bench_track.py --fills)
TRACK_FILL_HELP = ("Tracking: a track found again after a miss of at most this many seconds gets interpolated boxes for the "
                   "missed frames in the JSON lines (marked \"interpolated\": true, no score; lines then wait up to this long "
                   "before they are written); 0 turns it off.")


def _check_track_flags(tracker: str, high: Optional[float], low: Optional[float], fill: float = 0.0) -> None:
    """What the tracking flags alone can get wrong, checked before the model loads."""
    from ddetr_cli.engine.track import TRACKERS

    if tracker.strip().lower() not in TRACKERS:
        raise UserError(f"unknown --tracker {tracker!r}; choose from {', '.join(TRACKERS)}")
    if high is not None and low is not None and low > high:
        raise UserError(f"--track-low ({low:g}) must not be above --track-high ({high:g})")


def _track_settings(tracker: str, high: Optional[float], low: Optional[float], fill: float, cfg=None):
    """The tracking settings: flags first, then the model card's thresholds (``cfg``: a ModelConfig), then the defaults."""
    from ddetr_cli.engine.track import TrackSettings, track_thresholds

    _check_track_flags(tracker, high, low)
    name = tracker.strip().lower()
    hi, lo = track_thresholds(cfg, high, low)
    if lo > hi:
        raise UserError(f"the track low threshold {lo:g} is above the high one {hi:g} (--track-low / --track-high, or the model "
                        f"card's track_low / track_high)")
    return TrackSettings(tracker=name, high=hi, low=lo, fill_s=fill)


@app.command()
def video(
    source: Annotated[str, typer.Argument(
            help="Video file, MOTChallenge sequence folder (seqinfo.ini + img1/), webcam (cam0, cam1 or 0), or rtsp:// rtmp:// "
                 "http(s):// stream.", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name, hub folder, official .pth or .safetensors. "
                                                                       "Default: the COCO model.")] = None,
    show: Annotated[bool, typer.Option("--show", help="Live window with boxes, ids and FPS (q or Esc quits).")] = False,
    save: Annotated[bool, typer.Option("--save", help="Write the annotated video (H.264 MP4) to the run folder.")] = False,
    save_json: Annotated[bool, typer.Option("--save-json", help="Write one JSON line per processed frame (default when nothing else is "
                                                                "asked for).")] = False,
    track: Annotated[bool, typer.Option("--track", help="Track objects: ids stable across frames, kept through short misses; the JSON "
                                                        "lines say when each id starts and ends.")] = False,
    tracker: Annotated[str, typer.Option("--tracker", help=TRACKER_HELP)] = "cbiou",
    track_high: Annotated[Optional[float], typer.Option("--track-high", help=TRACK_HIGH_HELP, min=0.0, max=1.0)] = None,
    track_low: Annotated[Optional[float], typer.Option("--track-low", help=TRACK_LOW_HELP, min=0.0, max=1.0)] = None,
    track_fill: Annotated[float, typer.Option("--track-fill", help=TRACK_FILL_HELP, min=0.0)] = TRACK_FILL_DEFAULT,
    masks: Annotated[bool, typer.Option("--masks", help="Instance masks as COCO polygons ('segmentation') in the JSON lines (needs a "
                                                        "model with a mask head, e.g. detr-resnet-50-panoptic). Masks are drawn whenever "
                                                        "the model makes them.")] = False,
    panoptic: Annotated[bool, typer.Option("--panoptic", help="Write a panoptic segment map per processed frame beside the video "
                                                              "(COCO panoptic: <name>_panoptic/<frame>.png + <name>_panoptic.json); "
                                                              "--save/--show then draw the maps. Needs a mask head.")] = False,
    panoptic_conf: Annotated[float, typer.Option("--panoptic-conf", help="With --panoptic: score a query needs to take part in the "
                                                                         "segment map.", min=0.0, max=1.0)] = 0.85,
    conf: Annotated[float, typer.Option(help="Score threshold of what is drawn and saved (with --track, boxes that continue a track "
                                             "are kept below it).", min=0.0, max=1.0)] = 0.3,
    classes: Annotated[Optional[list[str]], typer.Option("--classes", help="Keep only these classes: names or category ids as in "
                                                                           "predictions.json (repeat or comma-separate).")] = None,
    max_det: Annotated[int, typer.Option("--max-det", help="Most detections per frame.", min=1)] = 100,
    imgsz: Annotated[Optional[int], typer.Option(help="Short side frames are resized to (default: the size the model was trained at; 800 "
                                                      "for the COCO models).", min=32)] = None,
    batch: Annotated[Optional[int], typer.Option(help="Consecutive frames per forward pass (files only). Default: as many as fit "
                                                      "the pixel budget of ddetr detect's default batching (on CPU 8 at 256x341, "
                                                      "one at 800x1066).", min=1, show_default=False)] = None,
    vid_stride: Annotated[int, typer.Option("--vid-stride", help="Process every N-th frame of a file.", min=1)] = 1,
    every_frame: Annotated[bool, typer.Option("--every-frame", help="Live sources: process every frame (may lag) instead of the newest "
                                                                    "one.")] = False,
    reconnect: Annotated[bool, typer.Option("--reconnect/--no-reconnect", help="Reopen a dropped stream with exponential backoff.")] = True,
    reconnect_timeout: Annotated[float, typer.Option(
            "--reconnect-timeout", help="Give up after this many seconds without a frame.", min=0.0)] = 120.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    half: Annotated[bool, typer.Option(help=HALF_HELP)] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, min=1, show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/video/expN, never overwritten).")] = None,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Replace the earlier ddetr run in --out (default: a non-empty --out is "
                                                              "refused).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
) -> None:
    """Detect (and track) objects in a video file, webcam or network stream.

    Files are processed frame by frame; live sources always take the newest frame and count the
    stale ones dropped. Ctrl-C stops cleanly: the video file stays playable (exit code 130).

    Examples:

      ddetr video clip.mp4 --save --save-json --batch 4

      ddetr video cam0 --show --track

      ddetr video clip.mp4 --panoptic --save --model detr-resnet-50-panoptic

      ddetr video rtsp://192.168.1.20:554/stream --track --save --reconnect-timeout 600

      ddetr video clip.mp4 --track --tracker bytetrack --track-high 0.6 --save-json

      ddetr video MOT17-04-FRCNN/ --track --track-fill 0
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ddetr_cli.engine.video import VideoPipeline, VideoStats, parse_source

    quiet = quiet or as_json
    _use_threads(threads)
    if not (show or save or save_json):
        save_json = True
    live = parse_source(source).live  # a bad source fails here, before the model loads or a run folder is made
    _check_track_flags(tracker, track_high, track_low)  # a bad flag fails before the model loads
    det, class_ids = _load_detector(model, device, half, imgsz, classes)
    settings = _track_settings(tracker, track_high, track_low, track_fill, det.cfg)
    if masks or panoptic:
        _require_masks(det, model, "--masks" if masks else "--panoptic")

    def log(msg: str) -> None:
        # drops, reconnects and a refused --show matter even in --quiet runs
        console.print(f"[yellow]video:[/] {msg}", highlight=False, soft_wrap=True)

    pipe_kw = dict(conf=conf, max_det=max_det, classes=class_ids, batch=batch, stride=vid_stride, latest=not every_frame,
                   track=track, track_settings=settings, masks=masks, panoptic=panoptic, panoptic_conf=panoptic_conf,
                   show=show, save=save, save_json=save_json, reconnect=reconnect,
                   reconnect_timeout=reconnect_timeout, log=log)
    run_dir = _run_dir(out_dir, "video", exist_ok)
    columns = (
        [TextColumn("[bold]video"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
         TimeElapsedColumn(), TimeRemainingColumn()]
        if not live else [TextColumn("[bold]stream[/] {task.fields[status]}"), TimeElapsedColumn()]
    )
    progress = Progress(*columns, console=console, disable=quiet, transient=False)
    task = progress.add_task("video", total=None, status="starting")
    last = [0.0]

    def on_progress(s: VideoStats) -> None:
        now = time.perf_counter()
        if now - last[0] < 0.2 and (s.total is None or s.frames < s.total):
            return  # redrawing per frame would cost more than a tiny model's frame
        last[0] = now
        if live:
            status = f"{s.frames} frames, {s.fps:.1f} fps, dropped {s.dropped}, reconnects {s.reconnects}"
        else:
            status = f"{s.fps:.1f} fps"
        progress.update(task, completed=s.frames, total=s.total, status=status)

    pipe = VideoPipeline(det, source, run_dir, **pipe_kw, on_progress=on_progress)
    with progress:
        res = pipe.run(handle_signals=True)
    if as_json:
        _print_json(res.to_dict())
    elif not quiet:
        _video_summary(res)
    if res.error:
        fail(res.error)
    if res.stopped == "signal":
        raise typer.Exit(130)


def _video_summary(res) -> None:
    extra = f", {res.tracks} tracks" if res.tracks else ""
    extra += f" (+{res.interpolated} interpolated boxes in the JSON lines)" if res.interpolated else ""
    console.print(
        f"ddetr video: {res.frames} frames processed ({res.read} read, {res.dropped} dropped, {res.reconnects} reconnects), "
        f"{res.detections} detections{extra}, {res.seconds:.1f} s, {res.fps:.2f} FPS"
        + ("" if res.stopped in ("end", "error") else f" [yellow](stopped: {res.stopped})[/]"),
        highlight=False,
    )
    for kind, path in res.outputs.items():
        console.print(f"{kind:>7}: {path}", highlight=False)


# -- eval ---------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    dataset: Annotated[str, typer.Argument(help="'coco' for COCO val2017, or a COCO/YOLO/VOC dataset folder; with --track a video "
                                                "file, a MOTChallenge sequence folder (its gt/gt.txt is the default --gt), or the "
                                                ".jsonl of an earlier 'ddetr video --track --save-json'.",
                                           show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name, hub folder, official .pth or .safetensors. "
                                                                       "Default: the COCO model.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="With 'coco': a folder holding val2017/ and "
                                                                "annotations/instances_val2017.json (default: download once into the "
                                                                "cache).")] = None,
    split: Annotated[str, typer.Option(help="Dataset split to score (val, test, train, ...).")] = "val",
    conf: Annotated[float, typer.Option(
            help="Score threshold. Default none: the reference scores the top --max-det per image.", min=0.0, max=1.0)] = 0.0,
    max_det: Annotated[int, typer.Option("--max-det", help="Detections kept per image (COCO scores at most 100).", min=1)] = 100,
    imgsz: Annotated[Optional[int], typer.Option(help="Short side the images are resized to (default: the size the model was trained at; "
                                                      "800 for the COCO models).", min=32)] = None,
    batch: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    half: Annotated[bool, typer.Option(help=HALF_HELP)] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, min=1, show_default=False)] = None,
    max_images: Annotated[Optional[int], typer.Option("--max-images", help="Score only the first N images (quick checks).", min=1)] = None,
    classes: Annotated[Optional[list[str]], typer.Option("--classes", help="--track: track only these classes (names or category ids; "
                                                                           "repeat or comma-separate).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/eval/expN, never overwritten).")] = None,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Replace the earlier ddetr run in --out (default: a non-empty --out is "
                                                              "refused).")] = False,
    save_predictions: Annotated[bool, typer.Option("--save-predictions", help="Also write predictions.json (COCO results list).")] = False,
    panoptic: Annotated[bool, typer.Option("--panoptic", help="Panoptic quality (PQ, SQ, RQ; all, things, stuff) on a COCO panoptic "
                                                              "dataset (annotations/panoptic_<split>.json + PNGs) instead of AP; "
                                                              "needs a mask head.")] = False,
    panoptic_conf: Annotated[float, typer.Option("--panoptic-conf", help="With --panoptic: score a query needs to take part in the "
                                                                         "segment map.", min=0.0, max=1.0)] = 0.85,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or tables.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
    track: Annotated[bool, typer.Option("--track", help="Score tracking (IDF1, HOTA, MOTA, id switches, ...) against --gt.")] = False,
    gt: Annotated[Optional[Path], typer.Option("--gt", help="--track: ground truth, a MOTChallenge gt.txt (MOT17 rules: consider "
                                                            "flag 1, class 1; distractors not scored) or a clip JSON like "
                                                            "examples/clip.json (default: the video's name with .json; a sequence "
                                                            "folder's gt/gt.txt).")] = None,
    tracker: Annotated[str, typer.Option("--tracker", help="--track: " + TRACKER_HELP)] = "cbiou",
    track_high: Annotated[Optional[float], typer.Option("--track-high", help=TRACK_HIGH_HELP, min=0.0, max=1.0)] = None,
    track_low: Annotated[Optional[float], typer.Option("--track-low", help=TRACK_LOW_HELP, min=0.0, max=1.0)] = None,
    track_fill: Annotated[float, typer.Option("--track-fill", help="--track: " + TRACK_FILL_HELP, min=0.0)] = TRACK_FILL_DEFAULT,
    vid_stride: Annotated[int, typer.Option("--vid-stride", help="--track: process every N-th frame (the others are not scored).",
                                            min=1)] = 1,
) -> None:
    """Score a model with COCO metrics (AP, AP50, ..., AR100) on COCO val2017 or your own data,
    or (--track) score tracking on a video against MOT-style ground truth.

    Writes metrics.json, pr_curve.png and (--save-predictions) predictions.json. Mask AP is
    reported beside box AP when the dataset has segmentations and the model has a mask head.
    With --track: track_metrics.json, the JSON lines of the run and tracks.txt (MOTChallenge
    results, for TrackEval); --conf (default 0.3 there) is the video's drawing threshold.

    Examples:

      ddetr eval coco --model deformable-detr --batch 8

      ddetr eval coco --data /datasets/coco --max-images 500

      ddetr eval ./mydata --model runs/finetune/exp/best.safetensors --json

      ddetr eval examples/clip.mp4 --track --model demo

      ddetr eval MOT17-04.mp4 --track --gt MOT17-04/gt/gt.txt --classes person --tracker bytetrack

      ddetr eval MOT17-04-FRCNN/ --track --classes person

      ddetr eval runs/video/exp/clip.jsonl --track --gt examples/clip.json

      ddetr eval ./panoptic-data --panoptic --model detr-resnet-50-panoptic
    """
    _use_threads(threads)
    if track:
        return _eval_track(dataset, gt, model=model, conf=conf, classes=classes, max_det=max_det, imgsz=imgsz, batch=batch,
                           device=device, half=half, out_dir=out_dir, exist_ok=exist_ok, quiet=quiet, as_json=as_json,
                           settings=(tracker, track_high, track_low, track_fill), vid_stride=vid_stride)
    from ddetr_cli.data.coco_val import CocoUnavailable, ensure_val2017
    from ddetr_cli.data.datasets import load_dataset
    from ddetr_cli.engine.evaluator import EvalError, evaluate
    from ddetr_cli.engine.predictor import Detector

    show = not (quiet or as_json)
    if panoptic:
        _eval_panoptic(dataset, model, split, imgsz, batch, device, half, max_images, out_dir, exist_ok, panoptic_conf, show,
                       as_json)
        return
    try:
        if dataset.lower() == "coco":
            bars = _DownloadBars(show)
            try:
                root = ensure_val2017(data, progress=bars)
            finally:
                bars.close()
            ds = load_dataset(root, split="val", format="coco")
        else:
            if data is not None:
                raise UserError("--data goes with 'coco'; give your dataset folder as the argument instead")
            ds = load_dataset(Path(dataset), split=split)
        if show:
            console.print(f"[bold]{ds.root}[/] ({ds.format}, {ds.split}): " + "; ".join(ds.report.summary()), highlight=False)
        det = Detector.from_pretrained(model, device=device, half=half, imgsz=imgsz)
    except (CocoUnavailable, ValueError) as e:
        if isinstance(e, _known_errors()):
            raise
        raise UserError(str(e)) from None
    run_dir = _run_dir(out_dir, "eval", exist_ok)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=not show)
    with progress:
        task = progress.add_task("eval", total=min(len(ds), max_images or len(ds)))
        try:
            res = evaluate(det, ds, batch=batch, max_images=max_images, conf=conf, max_det=max_det, out_dir=run_dir,
                           save_predictions=save_predictions,
                           progress=lambda done, total: progress.update(task, completed=done, total=total))
        except EvalError as e:
            raise UserError(str(e)) from None
    res.settings["model"] = model or "default"
    if as_json:
        _print_json(res.to_dict())
    elif not quiet:
        _eval_summary(res)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _eval_track(source: str, gt: Optional[Path], *, model, conf: float, classes, max_det: int, imgsz, batch: int, device: str,
                half: bool, out_dir: Optional[Path], exist_ok: bool, quiet: bool, as_json: bool, settings, vid_stride: int) -> None:
    """``ddetr eval SOURCE --track``: a video or MOTChallenge sequence folder is tracked (then
    scored), a .jsonl is scored as it is. ``settings``: (tracker, high, low, fill) as flagged."""
    from ddetr_cli.engine.track_eval import TrackEvalError, TrackEvalResult, evaluate_video, score_tracks, write_result
    from ddetr_cli.engine.video import parse_source
    from ddetr_cli.formats.mot import TrackFileError, read_truth, read_video_jsonl

    src = Path(source)
    from_jsonl = src.suffix.lower() == ".jsonl"
    if gt is None:
        gt = src / "gt" / "gt.txt" if src.is_dir() else src.with_suffix(".json")
        if from_jsonl or not gt.is_file():
            where = f"{src.name}/gt/gt.txt" if src.is_dir() else f"{gt.name} beside {src.name}"
            raise UserError(f"--track needs --gt (a MOTChallenge gt.txt or a clip JSON); there is no {where}")
    try:
        truth = read_truth(gt)
        if from_jsonl:
            tracks = read_video_jsonl(src)
            res = TrackEvalResult(score_tracks(truth, tracks), settings={"source": str(src), "gt": str(gt)})
            if out_dir is not None:
                write_result(res, _run_dir(out_dir, "eval", exist_ok), tracks)
        else:
            live = parse_source(source).live
            if live:
                raise UserError(f"{source}: --track scores a video file (a live source has no ground truth frames)")
            _check_track_flags(*settings)  # a bad flag fails before the model loads
            det, class_ids = _load_detector(model, device, half, imgsz, classes)
            settings = _track_settings(*settings, det.cfg)
            run_dir = _run_dir(out_dir, "eval", exist_ok)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(TextColumn("[bold]track"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                                disable=quiet or as_json)
            with progress:
                task = progress.add_task("track", total=None)
                res = evaluate_video(det, source, truth, run_dir, settings=settings, conf=conf if conf > 0 else 0.3, classes=class_ids,
                                     max_det=max_det, batch=batch, stride=vid_stride, handle_signals=False,
                                     on_progress=lambda st: progress.update(task, completed=st.frames, total=st.total))
            res.settings.update(model=model or "default", gt=str(gt))
    except (TrackFileError, TrackEvalError) as e:
        raise UserError(str(e)) from None
    if as_json:
        _print_json(res.to_dict())
    elif not quiet:
        _track_summary(res)


def _track_summary(res) -> None:
    from ddetr_cli.engine.track_eval import METRIC_HELP

    m = res.metrics
    t = Table(title=f"ddetr eval --track: {m['frames']} frames, {m['objects']} objects ({m['gt_boxes']} boxes), "
                    f"{m['tracks']} track ids ({m['boxes']} boxes)", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("", style="dim")
    for k, help_ in METRIC_HELP.items():
        v = m[k]
        t.add_row(f"[bold]{k}[/]" if k == "IDF1" else k, f"{v:.3f}" if isinstance(v, float) else str(v), help_)
    console.print(t)
    st = res.settings
    if "tracker" in st:
        console.print(f"tracker {st['tracker']}, high {st['high']:g}, low {st['low']:g}, gaps filled up to {st['fill_s']:g} s, "
                      f"conf {st['conf']:g}; {res.seconds:.1f} s", highlight=False)
    for kind, path in res.outputs.items():
        console.print(f"{kind:>7}: {path}", highlight=False)


def _eval_panoptic(dataset: str, model, split: str, imgsz, batch: int, device: str, half: bool, max_images, out_dir,
                   exist_ok: bool, threshold: float, show: bool, as_json: bool) -> None:
    """``eval --panoptic``: PQ on a COCO panoptic dataset folder."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ddetr_cli.engine.evaluator import EvalError
    from ddetr_cli.engine.panoptic_eval import evaluate_panoptic
    from ddetr_cli.formats.panoptic import read_panoptic

    if dataset.lower() == "coco":
        raise UserError("--panoptic scores a COCO panoptic dataset folder (annotations/panoptic_<split>.json + PNGs); "
                        "give its folder")
    ds = read_panoptic(Path(dataset), split)
    det, _ = _load_detector(model, device, half, imgsz)
    _require_masks(det, model, "--panoptic")
    if show:
        console.print(f"[bold]{ds.root}[/] (COCO panoptic, {ds.split}): {len(ds.images)} images, {len(ds.categories)} categories",
                      highlight=False)
    run_dir = _run_dir(out_dir, "eval", exist_ok)
    progress = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=not show)
    with progress:
        task = progress.add_task("eval", total=min(len(ds.images), max_images or len(ds.images)))
        try:
            res = evaluate_panoptic(det, ds, out_dir=run_dir, batch=batch, max_images=max_images, threshold=threshold,
                                    progress=lambda done, total: progress.update(task, completed=done, total=total))
        except EvalError as e:
            raise UserError(str(e)) from None
    res.settings["model"] = model or "default"
    if as_json:
        _print_json(res.to_dict())
    elif show:
        t = Table(title=f"ddetr eval --panoptic: {res.images} images", title_justify="left")
        for col in ("", "PQ", "SQ", "RQ", "categories"):
            t.add_column(col, justify="right" if col else "left")
        for name, v in res.summary.items():
            t.add_row(f"[bold]{name}[/]" if name == "All" else name, _fmt(v["pq"]), _fmt(v["sq"]), _fmt(v["rq"]), str(v["n"]))
        console.print(t)
        c = Table(title="per class", title_justify="left")
        for col in ("class", "kind", "PQ", "SQ", "RQ", "TP", "FP", "FN"):
            c.add_column(col, justify="left" if col in ("class", "kind") else "right")
        for r in sorted(res.per_class, key=lambda r: -(r["pq"] if r["pq"] is not None else -1)):
            c.add_row(r["class"], "thing" if r["isthing"] else "stuff", _fmt(r["pq"]), _fmt(r["sq"]), _fmt(r["rq"]),
                      str(r["tp"]), str(r["fp"]), str(r["fn"]))
        console.print(c)
        for kind, path in res.outputs.items():
            console.print(f"{kind:>12}: {path}", highlight=False)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


class _DownloadBars:
    """One rich download bar per file; ``close`` stops any still drawn (also after a failure)."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.bars: dict[str, tuple] = {}

    def __call__(self, name: str, done: int, total: Optional[int]) -> None:
        if not self.show:
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        if name not in self.bars:
            self.close()
            p = Progress(TextColumn(f"[bold]{name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                         TimeRemainingColumn(), console=console)
            p.start()
            self.bars[name] = (p, p.add_task(name, total=total, completed=done))
        p, task = self.bars[name]
        p.update(task, completed=done, total=total)

    def close(self) -> None:
        for p, _ in self.bars.values():
            p.stop()


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def _eval_summary(res) -> None:
    from ddetr_cli.engine.evaluator import METRIC_HELP

    ds = res.dataset
    t = Table(title=f"ddetr eval: {res.images} images, {ds.get('boxes', 0)} boxes, {res.detections} detections",
              title_justify="left")
    t.add_column("metric")
    masks = res.mask_metrics is not None
    t.add_column("box" if masks else "value", justify="right")
    if masks:
        t.add_column("mask", justify="right")
    t.add_column("", style="dim")
    for k, v in res.metrics.items():
        cells = [_fmt(v)] + ([_fmt(res.mask_metrics.get(k))] if masks else [])
        t.add_row(f"[bold]{k}[/]" if k == "AP" else k, *cells, METRIC_HELP.get(k, ""))
    console.print(t)
    c = Table(title="per-class AP", title_justify="left")
    cols = ["AP", "AP50", "AP75"] + (["mask_AP", "mask_AP50", "mask_AP75"] if masks else [])
    c.add_column("class")
    c.add_column("instances", justify="right")
    for col in cols:
        c.add_column(col.replace("_", " "), justify="right")
    for r in sorted(res.per_class, key=lambda r: -(r["AP"] if r["AP"] is not None else -1)):
        name = r["class"] if r.get("in_model", True) else f"{r['class']} [dim](not in model)[/]"
        c.add_row(name, str(r["instances"]), *(_fmt(r.get(col)) for col in cols))
    console.print(c)
    s = res.speed
    console.print(f"speed per image: decode {s['decode_ms']:.1f} ms, preprocess {s['preprocess_ms']:.1f} ms, "
                  f"model {s['inference_ms']:.1f} ms, postprocess {s['postprocess_ms']:.1f} ms; "
                  f"{s['images_per_second']:.2f} img/s overall", highlight=False)
    for kind, path in res.outputs.items():
        console.print(f"{kind:>11}: {path}", highlight=False)


# -- serve --------------------------------------------------------------------------------------


def _model_version(model: Optional[str]) -> str:
    """What predictions are tagged with: the model name as given, a weights file's stem."""
    from ddetr_cli.weights.store import DEFAULT_MODEL

    name = model or DEFAULT_MODEL
    p = Path(name).expanduser()
    return (p.stem if p.is_file() else p.name) if p.exists() else name


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name, hub folder, official .pth or .safetensors. "
                                                                       "Default: the COCO model.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one, printed at start).", min=0, max=65535)] = 9090,
    conf: Annotated[float, typer.Option(help="Score threshold.", min=0.0, max=1.0)] = 0.3,
    classes: Annotated[Optional[list[str]], typer.Option("--classes", help="Predict only these classes: names or category ids "
                                                                           "(repeat or comma-separate).")] = None,
    max_det: Annotated[int, typer.Option("--max-det", help="Most detections per image.", min=1)] = 100,
    masks: Annotated[bool, typer.Option("--masks", help="Polygons for the config's PolygonLabels (needs a model with a mask "
                                                        "head, e.g. detr-resnet-50-panoptic).")] = False,
    imgsz: Annotated[Optional[int], typer.Option(help="Short side the images are resized to (default: the model's).", min=32)]
    = None,
    batch: Annotated[int, typer.Option(help="Images per forward pass (a request's tasks are batched).", min=1)] = 4,
    workers: Annotated[int, typer.Option(help="Image-reading threads.", min=1)] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    half: Annotated[bool, typer.Option(help="Half precision (GPU).")] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, min=1, show_default=False)] = None,
    model_version: Annotated[Optional[str], typer.Option("--model-version", help="The predictions' model_version (default: the "
                                                                                 "model's name).")] = None,
    ls_url: Annotated[Optional[str], typer.Option("--ls-url", envvar="LABEL_STUDIO_URL", help="Label Studio's URL, to read "
                                                  "its own image URLs (/data/upload/..., /data/local-files/..., cloud "
                                                  "storage). Default: the hostname Label Studio sends when it connects.")]
    = None,
    ls_api_key: Annotated[Optional[str], typer.Option("--ls-api-key", envvar="LABEL_STUDIO_API_KEY", show_default=False,
                                                      help="Label Studio API key (legacy token or personal access token) for "
                                                      "those URLs.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No access log.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {url, model_version, ...} as JSON on stdout once listening.")]
    = False,
) -> None:
    """Serve the model to Label Studio as an ML backend (pre-labels as tasks are opened or on request).

    Speaks Label Studio's ML backend protocol: GET /health, POST /setup, POST /predict (tasks in,
    rectanglelabels in percent out, polygonlabels with --masks, a score per region and per task),
    POST /webhook. Labels go to the config's Labels of the same name; classes the config lacks
    are dropped (logged once). In Label Studio: project Settings -> Model -> Connect Model, URL
    http://HOST:PORT. Ctrl-C (or SIGTERM) stops after the requests in flight.

    Examples:

      ddetr serve --model demo

      LABEL_STUDIO_URL=http://localhost:8080 LABEL_STUDIO_API_KEY=KEY ddetr serve --model demo --port 9090

      ddetr serve --model detr-resnet-50-panoptic --masks --conf 0.5 --device cuda
    """
    try:
        import uvicorn  # noqa: F401

        from ddetr_cli.engine.ml_backend import LabelStudioBackend
        from ddetr_cli.engine.serve import bind, run_server
    except ImportError as e:
        raise UserError(f"ddetr serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'ddetr-cli[serve]'") from None

    _use_threads(threads)
    try:  # the port first: a busy one is known before the model loads
        sock = bind(host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        det, class_ids = _load_detector(model, device, half, imgsz, classes)
        if masks:
            _require_masks(det, model)
    except BaseException:
        sock.close()
        raise
    version = model_version or _model_version(model)
    backend = LabelStudioBackend(det, version, conf=conf, classes=class_ids, max_det=max_det, masks=masks, batch=batch,
                                 workers=workers, label_studio_url=ls_url, api_key=ls_api_key,
                                 log=lambda msg: console.print(f"[yellow]ddetr serve[/]: {msg}", highlight=False, soft_wrap=True))

    def started(url: str) -> None:
        console.print(f"ddetr serve: Label Studio ML backend at {url} (model {version}, {det.device}); Ctrl-C stops",
                      highlight=False, soft_wrap=True)
        if as_json:
            _print_json({"url": url, "model_version": version, "device": str(det.device),
                         "classes": det.labels.names, "masks": masks})

    import signal

    stopped_by = run_server(backend, sock, access_log=not quiet, on_start=started)
    console.print("ddetr serve: stopped", highlight=False)
    if stopped_by == signal.SIGINT:
        raise typer.Exit(130)  # Ctrl-C, as every command; SIGTERM (a service manager) is a normal stop


# -- finetune -----------------------------------------------------------------------------------


def _finetune_parameters() -> list[inspect.Parameter]:
    """``ddetr finetune``'s parameters, built from ``FinetuneOptions`` (each option declared once
    there: default, help, flag), plus the dataset argument and the command-only flags."""
    import dataclasses
    import typing

    from ddetr_cli.engine.options import FinetuneOptions

    hints = typing.get_type_hints(FinetuneOptions)
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        Optional[str], typer.Argument(help="Dataset folder (COCO, YOLO or Pascal VOC; detected).", show_default=False)])]
    for f in dataclasses.fields(FinetuneOptions):
        meta = f.metadata
        if "help" not in meta:
            continue  # set by the command itself (data, verbose)
        hint = hints[f.name]
        if type(None) in typing.get_args(hint):  # X | None -> X
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        base = list if typing.get_origin(hint) is list else hint
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        dashed = "--" + f.name.replace("_", "-")
        if base is bool:
            decls = [meta["flag"] or f"{dashed}/--no-{dashed[2:]}"]
        else:
            decls = [dashed] + ([meta["short"]] if meta["short"] else [])
        shown = f" (default {default})" if default not in (None, [], False) and base is not bool else ""
        if base is bool and meta["flag"] is None:
            shown = f" (default {'on' if default else 'off'})"
        opt = typer.Option(*decls, help=meta["help"] + shown, min=meta["min"], show_default=False)
        annotation = Annotated[Optional[list[str]] if base is list else Optional[base], opt]
        params.append(inspect.Parameter(f.name, kw, default=None, annotation=annotation))
    params += [
        inspect.Parameter("resume", kw, default=None, annotation=Annotated[Optional[str], typer.Option(
            "--resume", help="Continue a run: 'latest' or a run folder (a larger --epochs/--max-steps extends it).")]),
        inspect.Parameter("quiet", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--quiet", "-q", help="Less output.")]),
        inspect.Parameter("as_json", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--json", help="Print the result (run folder, best weights, mAP, history) as JSON on stdout.")]),
    ]
    return params


def finetune(**kwargs) -> None:
    """Fine-tune on your own labeled images; the best model is registered by name.

    Examples:

      ddetr finetune ./mydata --epochs 30 --name parts

      ddetr finetune ./mydata --scratch --arch backbone_depth=18 --arch d_model=128 --imgsz 320

      ddetr finetune ./mydata --backbone vit-small --backbone-weights vit_small_patch16_224.safetensors

      ddetr finetune --resume latest

      ddetr finetune --resume runs/finetune/exp --epochs 80   # train a finished run longer

      torchrun --nproc-per-node 2 -m ddetr_cli finetune ./mydata --device cuda
    """
    from ddetr_cli.engine.trainer import finetune_command

    code = finetune_command(kwargs.pop("data"), resume=kwargs.pop("resume"), quiet=kwargs.pop("quiet"),
                            as_json=kwargs.pop("as_json"), **kwargs)
    if code:
        raise typer.Exit(code)


finetune.__signature__ = inspect.Signature(_finetune_parameters())
app.command()(finetune)


# -- weights ------------------------------------------------------------------------------------


@weights_app.command("list")
def weights_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List named weights and whether they are available offline."""
    from ddetr_cli.weights.store import list_models

    entries = list_models()
    if as_json:
        _print_json([{**e.__dict__, "available": bool(e.path) and Path(e.path).exists()} for e in entries])
        return
    t = Table(title="ddetr weights")
    for col in ("name", "source", "available", "description"):
        t.add_column(col)
    for e in entries:
        avail = bool(e.path) and Path(e.path).exists()
        t.add_row(e.name, e.source, "[green]yes[/]" if avail else "[dim]pull[/]", e.description)
    out.print(t)


@weights_app.command("pull")
def weights_pull(
    name: Annotated[str, typer.Argument(help="A hub model name from `ddetr weights list`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (plain JSON on stdout).")] = False,
) -> None:
    """Download a hub model and convert it once to the project's format."""
    from ddetr_cli.weights.store import pull

    path = pull(name)
    _report(as_json, {"name": name, "path": str(path)}, f"{name}: {path}")


@weights_app.command("import")
def weights_import(
    path: Annotated[Path, typer.Argument(help="Hub folder, official .pth, or .safetensors.")],
    name: Annotated[Optional[str], typer.Option(help="Name to register (default: the file's stem, made unique).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-point --name if it is already registered.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (plain JSON on stdout).")] = False,
) -> None:
    """Convert a local weights file to the project's format and register it by name.

    Example: ddetr weights import ./checkpoint0049.pth --name coco-r50
    """
    from ddetr_cli.files import home
    from ddetr_cli.weights.load import detect_layout, load_model, save_model
    from ddetr_cli.weights.store import ModelNameError, check_name, register, unique_name

    try:  # before the (slow) conversion
        name = check_name(name, force) if name else unique_name(Path(path).stem.replace(".safetensors", ""))
    except ModelNameError as e:
        raise UserError(str(e)) from None
    layout = detect_layout(path)
    model = load_model(path)
    dst = save_model(model, home() / "models" / f"{name}.safetensors", extra_meta={"source": f"import:{layout}"})
    register(name, dst, source="import", description=f"{model.cfg.variant}, {model.cfg.num_classes} classes, from {layout} layout",
             force=force)
    _report(as_json, {"name": name, "path": str(dst), "layout": layout, "source": str(path)},
            f"imported {path} ({layout} layout) as [bold]{name}[/] -> {dst}")


@weights_app.command("rm")
def weights_rm(
    name: Annotated[str, typer.Argument(help="A registered name (bundled and hub names stay).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (plain JSON on stdout).")] = False,
) -> None:
    """Forget a registered name (and delete its converted file in the ddetr cache)."""
    from ddetr_cli.files import home
    from ddetr_cli.weights.store import unregister

    entry = unregister(name)
    p = Path(entry.path)
    if p.is_file() and home() in p.parents:
        p.unlink()
    _report(as_json, {"removed": name, "path": entry.path}, f"removed {name}")


@weights_app.command("info")
def weights_info(
    name: Annotated[str, typer.Argument(help="A name or a weights path.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (plain JSON on stdout).")] = False,
) -> None:
    """Show a model's variant, size and classes."""
    from ddetr_cli.weights.load import read_weights
    from ddetr_cli.weights.store import resolve

    path = resolve(name)
    cfg, sd, layout = read_weights(path)
    n_params = sum(t.numel() for t in sd.values())
    if as_json:
        labels = cfg.labels
        _print_json({"path": str(path), "layout": layout, "variant": cfg.variant, "parameters": n_params,
                     "backbone": cfg.backbone_label, "d_model": cfg.d_model, "queries": cfg.num_queries,
                     "num_classes": cfg.num_classes, "imgsz": cfg.imgsz, "track_high": cfg.track_high, "track_low": cfg.track_low,
                     "categories": [{"label": c.label, "id": c.id, "name": c.name} for c in labels]})
        return
    t = Table(show_header=False, box=None)
    for k, v in [("path", str(path)), ("layout", layout), ("variant", cfg.variant), ("parameters", f"{n_params / 1e6:.2f} M"),
                 ("backbone", cfg.backbone_label), ("d_model", cfg.d_model),
                 ("queries", cfg.num_queries), ("classes", cfg.num_classes),
                 ("names", ", ".join(n for n in cfg.class_names if n)[:300] or "-"),
                 ("tracking", _card_thresholds(cfg))]:
        t.add_row(f"[bold]{k}[/]", str(v))
    out.print(t)


def _card_thresholds(cfg) -> str:
    from ddetr_cli.engine.track import track_thresholds

    high, low = track_thresholds(cfg)
    own = cfg.track_high is not None or cfg.track_low is not None
    return f"high {high:g}, low {low:g} ({'measured for this model' if own else 'the defaults: the model card has none'})"


# file-system failures a user can act on: one line naming the path, not a traceback
_OS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
              errno.EEXIST, errno.ENAMETOOLONG}


def main() -> None:
    """Console entry point: Typer handles usage errors, exits and Ctrl-C (exit 130, quietly);
    known failures become one line. The known error types are looked up only once an error
    happened: importing them loads torch, which ``--help`` and usage errors never need.
    A run folder the failed command left empty is removed."""
    from ddetr_cli.files import drop_empty_runs

    try:
        app()
    except Exception as e:  # noqa: BLE001 - sorted below; unknown errors keep their traceback
        if isinstance(e, _known_errors()):
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2 if isinstance(e, UserError) else 1)
        if isinstance(e, OSError) and e.errno in _OS_ERRNOS:
            where = f" {e.filename}" if e.filename else ""
            console.print(f"[bold red]error:[/] cannot write{where}: {e.strerror}", highlight=False, soft_wrap=True)
            sys.exit(1)
        raise
    except KeyboardInterrupt:  # an interrupt outside a command (Typer maps those to 130)
        sys.exit(130)
    finally:
        drop_empty_runs()


if __name__ == "__main__":
    main()
