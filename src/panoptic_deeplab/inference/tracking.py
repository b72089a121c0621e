"""Instance ids that stay the same over the frames of a video: a small tracker on top of per-frame predictions.

Each frame is predicted on its own; :class:`InstanceTracker` then renumbers its thing instances so that one object
keeps one panoptic label over the whole sequence:

* a track is an instance number of one class, unique over the sequence (``train_id * label_divisor + number``);
  it remembers the object's pixels when last seen, its velocity (the motion of its mask's centroid per frame,
  updated only while the mask keeps its size within a factor 1.5: a mask shrinking behind an occluder moves its
  centroid without the object moving) and its radius (that of a disc of the largest area seen);
* in each frame, the instances of a class are matched to that class's tracks seen within the last ``memory``
  frames: cost ``1 - IoU`` between the instance's mask and the track's last mask moved by its velocity times the
  frames since (so an object hidden for a few frames is looked for where it went), one-to-one by the Hungarian
  method (``scipy.optimize.linear_sum_assignment``), a pair kept when its IoU reaches ``min_iou``;
* instances and tracks left over (an object that moved more than its own size, whose masks no longer overlap)
  are then matched by the distance between the instance's centroid and the track's moved centroid, again one
  to one, a pair kept within ``max_distance`` times the track's radius;
* an unmatched instance starts a new track with its class's next number; a track unseen for more than
  ``memory`` frames is dropped, and its number is never reused.

Stuff and void pixels pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from panoptic_deeplab.inference.postprocess import PanopticPrediction


# Largest change of a mask's area between two sightings that still counts as the object moving.
SIZE_CHANGE = 1.5


@dataclass
class _Track:
    number: int
    pixels: np.ndarray  # flat indices (y * width + x) when last seen
    centroid: np.ndarray  # (y, x) when last seen
    velocity: np.ndarray  # (dy, dx) per frame
    last_frame: int
    radius: float  # of a disc of the largest area seen


def _instance_pixels(label_map: np.ndarray, label_divisor: int, thing_train_ids: Iterable[int]
                     ) -> dict[int, np.ndarray]:
    """Flat pixel indices of every thing instance (number > 0) of ``label_map``, in one sort."""
    flat = label_map.ravel()
    is_instance = np.isin(flat // label_divisor, list(thing_train_ids)) & (flat % label_divisor > 0)
    where = np.flatnonzero(is_instance)
    labels = flat[where]
    order = np.argsort(labels, kind="stable")
    where, labels = where[order], labels[order]
    values, starts = np.unique(labels, return_index=True)
    return {int(v): part for v, part in zip(values, np.split(where, starts[1:]))}


def renumber_labels(label_map: np.ndarray, renumber: dict[int, int]) -> np.ndarray:
    """``label_map`` with every label that is a key of ``renumber`` replaced by its value (one lookup per pixel)."""
    if not renumber:
        return label_map.copy()
    old = np.array(sorted(renumber), dtype=np.int64)
    new = np.array([renumber[label] for label in old.tolist()], dtype=np.int64)
    position = np.clip(np.searchsorted(old, label_map), 0, len(old) - 1)
    return np.where(old[position] == label_map, new[position], label_map)


class InstanceTracker:
    """Renumbers the thing instances of successive frames so that an object keeps its label (module doc)."""

    def __init__(self, label_divisor: int, thing_train_ids: Iterable[int], min_iou: float = 0.2,
                 memory: int = 10, max_distance: float = 2.0) -> None:
        if not 0.0 < min_iou <= 1.0:
            raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
        if memory < 1:
            raise ValueError(f"memory must be at least 1 frame, got {memory}")
        if max_distance < 0:
            raise ValueError(f"max_distance must be at least 0, got {max_distance}")
        self.label_divisor, self.min_iou, self.memory = label_divisor, min_iou, memory
        self.max_distance = max_distance
        self.thing_train_ids = sorted(set(thing_train_ids))
        self.frame = -1
        self._tracks: dict[int, list[_Track]] = {c: [] for c in self.thing_train_ids}
        self._next_number: dict[int, int] = {c: 1 for c in self.thing_train_ids}

    def update(self, label_map: np.ndarray) -> dict[int, int]:
        """Match the instances of the next frame's ``label_map`` ([H, W] panoptic labels) to the tracks; returns
        the renumbering ``{label in this frame: label of its track}`` of every thing instance in it."""
        self.frame += 1
        height, width = label_map.shape
        instances = _instance_pixels(label_map, self.label_divisor, self.thing_train_ids)
        renumber: dict[int, int] = {}
        for train_id in self.thing_train_ids:
            mine = [label for label in instances if label // self.label_divisor == train_id]
            tracks = [t for t in self._tracks[train_id] if self.frame - t.last_frame <= self.memory]
            self._tracks[train_id] = tracks
            centroids = [np.array(divmod(instances[label], width), dtype=np.float64).mean(axis=1) for label in mine]
            matched = self._match([instances[label] for label in mine], centroids, tracks, height, width)
            for index, (label, centroid) in enumerate(zip(mine, centroids)):
                pixels = instances[label]
                track = matched.get(index)
                radius = float(np.sqrt(pixels.size / np.pi))
                if track is None:
                    track = _Track(self._new_number(train_id), pixels, centroid, np.zeros(2), self.frame, radius)
                    tracks.append(track)
                else:
                    if 1 / SIZE_CHANGE <= pixels.size / track.pixels.size <= SIZE_CHANGE:
                        track.velocity = (centroid - track.centroid) / (self.frame - track.last_frame)
                    track.pixels, track.centroid, track.last_frame = pixels, centroid, self.frame
                    track.radius = max(track.radius, radius)
                renumber[label] = train_id * self.label_divisor + track.number
        return renumber

    def _new_number(self, train_id: int) -> int:
        number = self._next_number[train_id]
        if number >= self.label_divisor:
            raise ValueError(f"class {train_id} has more than {self.label_divisor - 1} tracks in this sequence: "
                             "the label divisor leaves no room for more instance numbers")
        self._next_number[train_id] = number + 1
        return number

    def _match(self, masks: list[np.ndarray], centroids: list[np.ndarray], tracks: list[_Track], height: int,
               width: int) -> dict[int, _Track]:
        """Instance index -> track: the Hungarian method on the IoU with each track's moved mask, then on the
        centroid distance for what is left (module doc)."""
        if not masks or not tracks:
            return {}
        iou = np.zeros((len(masks), len(tracks)))
        distance = np.zeros((len(masks), len(tracks)))
        for j, track in enumerate(tracks):
            shift = track.velocity * (self.frame - track.last_frame)
            dy, dx = np.rint(shift).astype(np.int64)
            ys, xs = np.divmod(track.pixels, width)
            ys, xs = ys + dy, xs + dx
            inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            moved = ys[inside] * width + xs[inside]
            for i, pixels in enumerate(masks):
                common = np.intersect1d(pixels, moved, assume_unique=True).size
                iou[i, j] = common / (pixels.size + moved.size - common) if common else 0.0
            distance[:, j] = np.linalg.norm(np.array(centroids) - (track.centroid + shift), axis=1) / track.radius
        rows, cols = linear_sum_assignment(-iou)
        matched = {int(i): int(j) for i, j in zip(rows, cols) if iou[i, j] >= self.min_iou}
        left_rows = [i for i in range(len(masks)) if i not in matched]
        left_cols = [j for j in range(len(tracks)) if j not in matched.values()]
        if left_rows and left_cols:
            near = distance[np.ix_(left_rows, left_cols)]
            for a, b in zip(*linear_sum_assignment(near)):
                if near[a, b] <= self.max_distance:
                    matched[left_rows[a]] = left_cols[b]
        return {i: tracks[j] for i, j in matched.items()}

    def relabel(self, prediction: PanopticPrediction) -> PanopticPrediction:
        """``prediction`` (the next frame) with its instances renumbered by :meth:`update`."""
        label_map = prediction.label_map.cpu().numpy()
        renumber = self.update(label_map)
        if not renumber:
            return prediction
        device = prediction.label_map.device
        label_tensor = torch.from_numpy(renumber_labels(label_map, renumber)).to(device)
        ids = torch.tensor([renumber.get(label, label) for label in prediction.instances.ids.tolist()],
                           dtype=torch.int64, device=device)
        instances = dataclasses.replace(prediction.instances, label_map=label_tensor, ids=ids)
        return dataclasses.replace(prediction, label_map=label_tensor, instances=instances)
