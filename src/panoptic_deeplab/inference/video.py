"""Video files in and out with PyAV (the optional extra ``video``): frames are decoded, predicted and written one at a
time, so memory does not grow with the length of the video.

:func:`predict_video` predicts every frame with :meth:`Predictor.predict_sequence` (instances keep their labels
across frames) and writes them as one COCO panoptic prediction set whose images are named ``<video stem>_<frame
index, 6 digits>``, with segment ids that are stable across frames; :class:`VideoWriter` writes the overlays as an
H.264 MP4 (MPEG-4 part 2 where the FFmpeg inside PyAV lacks libx264), atomically.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np

from panoptic_deeplab.atomic import move_into_place
from panoptic_deeplab.data.coco_panoptic import DatasetError, Problem
from panoptic_deeplab.inference.predictor import predict_keyed_sequence
from panoptic_deeplab.inference.results import PanopticPredictionWriter, PanopticResult

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")


def is_video(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a video file (by its extension)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


class VideoExtraMissing(ValueError):
    """PyAV is not installed (a ValueError, like every unusable-input error the command line reports)."""


def _av() -> ModuleType:
    try:
        import av
    except ImportError:
        raise VideoExtraMissing("reading and writing videos needs the 'video' extra (PyAV is not installed): "
                                "pip install 'panoptic-deeplab[video]'") from None
    return av


def video_info(path: str | os.PathLike[str]) -> tuple[int, Fraction]:
    """(frame count as the container states it, 0 when unknown; frames per second) of a video file."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetError(Problem(str(path), "holds no video stream"))
            stream = container.streams.video[0]
            return int(stream.frames or 0), Fraction(stream.average_rate or 25)
    except av.error.FFmpegError as exc:
        raise DatasetError(Problem(str(path), f"not a readable video ({exc})")) from None


def read_frames(path: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """The frames of a video file as ``[H, W, 3]`` uint8 RGB arrays, decoded one at a time."""
    av = _av()
    video_info(path)  # a clear error for what is not a video, before the first frame is asked for
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as exc:
        raise DatasetError(Problem(str(path), f"video data broken after the frames read so far ({exc})")) from None


class VideoWriter:
    """Writes RGB frames to a video file, atomically: the file appears complete on :meth:`close`, or not at all."""

    def __init__(self, path: str | os.PathLike[str], fps: Fraction | float) -> None:
        self._av = _av()
        self.path = Path(path)
        handle, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=self.path.suffix, dir=self.path.parent)
        os.close(handle)
        self._tmp = Path(tmp)
        self._container: Any = self._av.open(str(self._tmp), mode="w")
        self._fps = Fraction(fps).limit_denominator(1001)
        self._stream: Any = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """Add one ``[H, W, 3]`` uint8 RGB frame (all frames one size; odd sizes are padded by one pixel, as the
        encoder's 4:2:0 chroma needs even ones)."""
        height, width = frame.shape[:2]
        if self._stream is None:
            codec = "libx264" if "libx264" in self._av.codecs_available else "mpeg4"
            self._stream = self._container.add_stream(codec, rate=self._fps)
            self._stream.width, self._stream.height = width + width % 2, height + height % 2
            self._stream.pix_fmt = "yuv420p"
        frame = np.pad(frame, ((0, self._stream.height - height), (0, self._stream.width - width), (0, 0)), mode="edge")
        for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and put the file in place."""
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        move_into_place(self._tmp, self.path)

    def discard(self) -> None:
        self._container.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def predict_video(
    predictor: Any, video: str | os.PathLike[str], json_path: str | os.PathLike[str], png_dir: str | os.PathLike[str]
) -> Iterator[tuple[str, np.ndarray, PanopticResult]]:
    """Predict every frame of ``video`` in order with ``predictor.predict_sequence``, writing one COCO panoptic
    prediction set (module doc). A generator of ``(frame name, RGB frame, result)``; the set is committed when it is
    exhausted and discarded if it fails or is closed early."""
    stem = Path(video).stem
    named = ((f"{stem}_{index:06d}", frame) for index, frame in enumerate(read_frames(video)))
    with PanopticPredictionWriter(json_path, png_dir, predictor.meta) as writer:
        for name, frame, result in predict_keyed_sequence(predictor, named):
            writer.add(result, f"{name}.png")
            yield name, frame, result
