"""A MOTChallenge sequence folder (``seqinfo.ini`` + ``img1/000001.jpg`` ...) read like a video.

``ImageSequence`` answers the part of ``cv2.VideoCapture``'s interface that the video pipeline
uses (``isOpened``, ``read``, ``grab``, ``retrieve``, ``get``, ``release``), so ``ddetr video
SEQ/`` reads the frames in order at the sequence's own ``frameRate`` and size.

    cap = ImageSequence("MOT17-04/")
    ok, frame = cap.read()          # (H, W, 3) uint8 BGR of img1/000001.jpg
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ddetr_cli.formats.mot import SeqInfo, read_seqinfo, sequence_images


class ImageSequence:
    """Frames of a sequence folder, one per ``read``; ``TrackFileError`` for a broken folder."""

    def __init__(self, seq: str | Path) -> None:
        self.seq = Path(seq)
        self.info: SeqInfo = read_seqinfo(self.seq)
        self.files = sequence_images(self.seq, self.info)
        self._next = 0
        self._grabbed: Path | None = None
        self._open = True

    def isOpened(self) -> bool:  # noqa: N802 - cv2.VideoCapture's name
        return self._open

    def grab(self) -> bool:
        if not self._open or self._next >= len(self.files):
            self._grabbed = None
            return False
        self._grabbed = self.files[self._next]
        self._next += 1
        return True

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        if self._grabbed is None:
            return False, None
        img = cv2.imread(str(self._grabbed), cv2.IMREAD_COLOR)
        return img is not None, img

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not self.grab():
            return False, None
        return self.retrieve()

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FPS: self.info.fps, cv2.CAP_PROP_FRAME_COUNT: float(len(self.files)),
                cv2.CAP_PROP_FRAME_WIDTH: float(self.info.width), cv2.CAP_PROP_FRAME_HEIGHT: float(self.info.height),
                cv2.CAP_PROP_POS_FRAMES: float(self._next)}.get(prop, 0.0)

    def release(self) -> None:
        self._open = False
