"""``ddetr detect``: a folder (or list, glob, URLs) of images -> COCO JSON, YOLO/VOC, annotated images.

Images are decoded in worker threads while the model runs on the previous batch; only a bounded
window of decoded images is held, so memory stays flat on folders of any size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from ddetr_cli.data.images import ImageReadError
from ddetr_cli.data.sources import expand_sources, is_url, load_source
from ddetr_cli.engine.draw import Annotator, write_image
from ddetr_cli.engine.panoptic import PANOPTIC_THRESHOLD
from ddetr_cli.engine.predictor import AUTO_BATCH_MAX, Detector
from ddetr_cli.engine.stop import Interrupted, StopRequest
from ddetr_cli.files import atomic_path, atomic_write_text
from ddetr_cli.formats.annotations import Instances, names_txt
from ddetr_cli.formats.coco import CocoWriter
from ddetr_cli.formats.labelstudio import LabelStudioWriter, image_url, labeling_config
from ddetr_cli.formats.masks import instance_polygons, require_masks
from ddetr_cli.formats.panoptic import PANOPTIC_JSON, PanopticWriter
from ddetr_cli.formats.voc import voc_image_set, voc_labelmap, voc_xml
from ddetr_cli.formats.yolo import yolo_data_yaml, yolo_lines

FORMATS = ("coco", "yolo", "voc", "labelstudio")
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Datumaro's COCO importer reads annotations/instances_<subset>.json beside images/.
DATUMARO_COCO = "annotations/instances_default.json"
YOLO_COMMENT = "ddetr detect pre-labels: ultralytics / supervision / Datumaro YOLO layout"


class DetectStopped(OSError):
    """Outputs could not be written (disk full, read-only folder): the run stopped, and
    predictions.json holds the last complete write; the message says how far it got."""


@dataclass
class DetectResult:
    out_dir: Path
    images: int = 0
    detections: int = 0
    per_class: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    incomplete: bool = False
    outputs: dict[str, str] = field(default_factory=dict)
    batches: int = 0  # forward passes
    threads: int = 0  # torch's intra-op threads during the run

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "images": self.images,
            "detections": self.detections,
            "per_class": dict(self.per_class.most_common()),
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.throughput, 3),
            "batches": self.batches,
            "threads": self.threads,
            "incomplete": self.incomplete,
            "outputs": self.outputs,
        }


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``<stem>_2<ext>``, ``_3``, ... so that no two images share a stem (compared
    without case): label files, VOC xml and tools that match by name without extension
    (CVAT, Datumaro) must not see ``x.jpg`` and ``x.png`` as one image."""
    stem, ext = _split_ext(name)
    if stem.lower() not in used:
        used.add(stem.lower())
        return name
    n = 2
    while f"{stem}_{n}".lower() in used:
        n += 1
    used.add(f"{stem}_{n}".lower())
    return f"{stem}_{n}{ext}"


def _split_ext(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    stem, ext = (stem, "." + ext) if dot and stem else (base, "")
    return (f"{head}/{stem}" if head else stem), ext


def _image_file_name(name: str) -> str:
    """The file name of an annotated image: its own, or ``<stem>.jpg`` for other formats."""
    stem, ext = _split_ext(name)
    return name if ext.lower() in IMAGE_FILE_SUFFIXES else stem + ".jpg"


def _source_path(src: str) -> str:
    """What ``ddetr_source`` records: the URL, or the local file's absolute path."""
    return src if is_url(src) else str(Path(src).absolute())


def link_image(dst: Path, source: str | None, image_rgb: np.ndarray) -> None:
    """Put the image at ``dst``: a hard link to the local file ``source`` (no copy; a symbolic
    link would not do: Datumaro refuses image paths that resolve outside the dataset), its
    bytes where a hard link is not possible (another file system), the decoded image for URLs.
    Atomic: an existing ``dst`` is replaced."""
    if source is not None and Path(source).is_file():
        with atomic_path(dst) as tmp:
            tmp.unlink()
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
        return
    write_image(dst, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))


def _link_coco(out_dir: Path, pred_path: Path) -> None:
    """``annotations/instances_default.json`` = predictions.json for Datumaro/CVAT (a relative
    link; a copy where links are not possible)."""
    dst = out_dir / DATUMARO_COCO
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() and os.readlink(dst) == os.path.join("..", pred_path.name):
        return
    try:
        tmp = dst.with_name(f".{dst.name}.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.join("..", pred_path.name), tmp)
        os.replace(tmp, dst)
    except OSError:
        atomic_write_text(dst, pred_path.read_bytes())


def run_detect(
    detector: Detector,
    sources: Sequence[str],
    out_dir: Path,
    *,
    conf: float = 0.3,
    max_det: int = 100,
    classes: Sequence[int] | None = None,
    batch: int | None = None,
    formats: Sequence[str] = ("coco",),
    save_images: bool = True,
    masks: bool = False,
    panoptic: bool = False,
    panoptic_conf: float = PANOPTIC_THRESHOLD,
    save_conf: bool = False,
    recursive: bool = False,
    workers: int = 4,
    checkpoint_every: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
    total_hint: Callable[[int], None] | None = None,
    ls_url: Callable[[str], str] | None = None,
) -> DetectResult:
    """Detect on every image the sources name; write outputs into ``out_dir``.

    ``batch``: images per forward pass, padded to the largest; None (the default) batches
    consecutive images that the model sees at one shape, as many as ``Detector.auto_batch`` says,
    so that no image is padded and each gets the detections it would get alone.

    Ctrl-C or SIGTERM (``engine.stop``) stops the run after the batch under way, writes a valid
    ``predictions.json`` marked ``"incomplete": true`` and raises ``stop.Interrupted`` (a
    KeyboardInterrupt with the signal) for the caller; a second signal stops at once.

    ``masks``: instance masks as COCO polygons in ``segmentation`` (and YOLO segmentation lines);
    needs a model with a mask head (``masks.MasksUnavailable`` otherwise, before anything is
    written). Annotated images show masks whenever the detector returns them.

    ``panoptic``: also one panoptic segmentation per image (``engine.panoptic``: queries above
    ``panoptic_conf``), in COCO panoptic format: ``panoptic/<stem>.png`` (segment ids as RGB)
    and ``panoptic.json``; annotated images then show the segment map. Needs a mask head too.

    The run folder is a dataset the tools import as it is: ``images/`` (links to the source
    images, under the COCO ``file_name``), ``predictions.json`` (COCO, every image record with
    its ``ddetr_source``) and ``annotations/instances_default.json`` (the same file, where
    Datumaro/CVAT look); ``yolo``: ``labels/<stem>.txt``, ``data.yaml``, ``classes.txt``
    (``save_conf``: the confidence as a sixth column); ``voc``: ``voc/Annotations/<stem>.xml``,
    ``voc/ImageSets/Main/default.txt``, ``voc/labelmap.txt``, ``voc/JPEGImages/``;
    ``labelstudio``: ``labelstudio.json`` (tasks with predictions) and ``labelstudio-config.xml``;
    ``ls_url`` maps an image path to the URL Label Studio loads it from (default
    ``labelstudio.image_url``: local-files URL relative to the current directory). An image it
    cannot map raises ``labelstudio.ImageURLError`` before anything is written.

    A failed output write (disk full, read-only folder) stops the run with ``DetectStopped``;
    predictions.json then holds the last complete write, which the message names.
    """
    bad = set(formats) - set(FORMATS)
    if bad:
        raise ValueError(f"unknown format(s) {', '.join(sorted(bad))}; choose from {', '.join(FORMATS)}")
    if masks or panoptic:
        require_masks(detector, flag="--panoptic" if panoptic and not masks else "--masks")
    items = list(expand_sources(sources, recursive))  # names only: cheap even for 10,000 files
    if total_hint:
        total_hint(len(items))
    labels = detector.labels
    ls = None
    if "labelstudio" in formats:
        ls = LabelStudioWriter(detector.cfg.variant, url=ls_url or image_url)
        for src, _ in items:
            ls.url(src)  # an image Label Studio cannot be pointed at fails here, before any output
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DetectStopped(f"cannot write {out_dir}: {e.strerror or e}") from None
    coco = CocoWriter(labels)
    pan = PanopticWriter(labels, out_dir / "panoptic") if panoptic else None
    annot = Annotator(labels) if save_images else None
    res = DetectResult(out_dir, threads=torch.get_num_threads())
    pred_path = out_dir / "predictions.json"
    res.outputs["coco"] = str(pred_path)
    pan_path = out_dir / PANOPTIC_JSON
    if pan is not None:
        res.outputs["panoptic"] = str(pan_path)
    if save_images:
        res.outputs["images"] = str(out_dir / "annotated")
    res.outputs["source_images"] = str(out_dir / "images")
    if "yolo" in formats:
        res.outputs["yolo"] = str(out_dir / "labels")
        res.outputs["data_yaml"] = str(out_dir / "data.yaml")
        atomic_write_text(out_dir / "data.yaml", yolo_data_yaml(labels, {"train": "images", "val": "images"},
                                                               path=out_dir.absolute(), comments=[YOLO_COMMENT]))
        atomic_write_text(out_dir / "classes.txt", names_txt(labels))
        (out_dir / "labels").mkdir(exist_ok=True)
    voc_dir = out_dir / "voc"
    if "voc" in formats:
        res.outputs["voc"] = str(voc_dir)
        atomic_write_text(voc_dir / "labelmap.txt", voc_labelmap(labels))
        (voc_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    ls_path = out_dir / "labelstudio.json"
    if ls is not None:
        res.outputs["labelstudio"] = str(ls_path)
        atomic_write_text(out_dir / "labelstudio-config.xml", labeling_config(labels.names, masks))
    (out_dir / "images").mkdir(exist_ok=True)
    used: set[str] = set()
    t0 = time.perf_counter()
    last_ckpt = t0

    def info() -> dict:
        return {
            "description": "ddetr detect predictions",
            "model": detector.cfg.variant,
            "conf": conf,
            "masks": masks,
            **({"panoptic_conf": panoptic_conf} if panoptic else {}),
            "images_processed": res.images,
            "images_total": len(items),
            "skipped": res.skipped,
            "incomplete": res.incomplete,
            "date_created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    saved = -1  # images in the last complete predictions.json

    def write_all(incomplete: bool) -> None:
        nonlocal saved
        coco.write(pred_path, {**info(), "incomplete": incomplete})
        if pan is not None:
            pan.write(pan_path, {**info(), "incomplete": incomplete})
        saved = res.images
        _link_coco(out_dir, pred_path)
        if "voc" in formats:
            ids = voc_image_set(_split_ext(im["file_name"])[0] for im in coco.images)
            atomic_write_text(voc_dir / "ImageSets" / "Main" / "default.txt", ids)
        if ls is not None:
            ls.write(ls_path)

    def flush_batch(pending: list[tuple[str, str, np.ndarray]]) -> None:
        nonlocal last_ckpt
        arrays = [img for _, _, img in pending]
        res.batches += 1
        if pan is not None:
            dets_list, pan_list = detector.predict_panoptic(arrays, conf, max_det, classes, panoptic_conf)
        else:
            dets_list, pan_list = detector.predict_arrays(arrays, conf, max_det, classes), [None] * len(arrays)
        for (src, name, img), dets, seg in zip(pending, dets_list, pan_list):
            h, w = img.shape[:2]
            if is_url(src) and _split_ext(name)[1].lower() not in IMAGE_FILE_SUFFIXES:
                name = _split_ext(name)[0] + ".jpg"  # written decoded into images/ under this name
            name = _unique(name, used)
            polygons = instance_polygons(dets) if masks else None
            instances = Instances.from_detections(dets, polygons)
            coco.add(name, w, h, instances, source=_source_path(src))
            if pan is not None:
                pan.add(name, w, h, seg, png_name=f"{_split_ext(name)[0]}.png", source=_source_path(src))
            res.images += 1
            res.detections += len(dets)
            res.per_class.update(labels.name(int(c)) for c in dets.class_id)
            stem = _split_ext(name)[0]
            local = None if is_url(src) else src
            link_image(out_dir / "images" / name, local, img)
            if "yolo" in formats:
                atomic_write_text(out_dir / "labels" / f"{stem}.txt", yolo_lines(instances, w, h, labels, save_conf))
            if "voc" in formats:
                atomic_write_text(voc_dir / "Annotations" / f"{stem}.xml", voc_xml(name, w, h, instances, labels))
                link_image(voc_dir / "JPEGImages" / name, local, img)
            if ls is not None:
                ls.add(src, w, h, instances, labels)
            if annot is not None:
                bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
                drawn = annot.draw_panoptic(bgr, seg) if seg is not None else annot.draw(bgr, dets)
                write_image(out_dir / "annotated" / _image_file_name(name), drawn)
            if progress:
                progress(res.images + len(res.skipped), len(items))
        pending.clear()
        if time.perf_counter() - last_ckpt > checkpoint_every:
            write_all(True)
            last_ckpt = time.perf_counter()

    try:  # a folder that cannot take the outputs fails now, before any work
        write_all(True)
    except OSError as e:
        raise DetectStopped(f"cannot write {pred_path}: {e.strerror or e}") from None
    stopped: OSError | None = None

    window: deque[tuple[str, str, Future]] = deque()
    it = iter(items)
    pending: list[tuple[str, str, np.ndarray]] = []
    pending_shape: tuple[int, int] | None = None
    lookahead = max(2 * (batch or AUTO_BATCH_MAX), workers * 2)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ddetr-decode")
    with StopRequest() as stop:
        try:
            while True:
                if stop.requested:  # between images: every output holds the same images
                    raise Interrupted("stopped by a signal", stop.signum)
                while len(window) < lookahead:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    window.append((nxt[0], nxt[1], pool.submit(load_source, nxt[0])))
                if not window:
                    break
                src, name, fut = window.popleft()
                try:
                    img = fut.result()
                except (ImageReadError, OSError, ValueError) as e:
                    res.skipped.append({"file": src, "reason": str(e)})
                    if progress:
                        progress(res.images + len(res.skipped), len(items))
                    continue
                size = batch or 1
                if batch is None and hasattr(detector, "auto_batch"):  # (a test stub may batch nothing)
                    # consecutive images of one input shape, unpadded
                    shape = detector.input_shape(*img.shape[:2])
                    if pending and shape != pending_shape:
                        flush_batch(pending)
                    pending_shape, size = shape, detector.auto_batch(shape)
                pending.append((src, name, img))
                if len(pending) >= size:
                    flush_batch(pending)
            if pending:
                flush_batch(pending)
        except KeyboardInterrupt:
            res.incomplete = True
            raise
        except OSError as e:  # an output write failed: keep what is complete, say where it stopped
            res.incomplete = True
            stopped = e
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            res.images = len(coco.images)  # a second signal may have cut an image's bookkeeping short
            res.seconds = time.perf_counter() - t0
            try:
                write_all(res.incomplete)
                atomic_write_text(out_dir / "summary.json", json.dumps(res.to_dict(), indent=2))
            except OSError as e:
                stopped = stopped or e
    if stopped is not None:
        raise DetectStopped(f"{stopped.strerror or stopped}{f' ({stopped.filename})' if stopped.filename else ''}: "
                            f"stopped after {res.images} of {len(items)} images; {pred_path} holds the first {saved}")
    return res
