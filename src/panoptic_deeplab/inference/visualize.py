"""Pictures of predictions: panoptic overlay with legend, center heatmap, offset field.

Pure numpy + PIL. Every function takes numpy arrays or torch tensors and returns an RGB ``PIL.Image``.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from panoptic_deeplab.data.coco_panoptic import DatasetMeta

# Viridis sampled at 17 evenly spaced points (the colormap is public domain, CC0); linear
# interpolation between them is within a couple of levels of the full 256-entry table.
_VIRIDIS_ANCHORS = np.array(
    [
        [68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141],
        [44, 114, 142], [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128], [63, 188, 115],
        [94, 201, 98], [132, 212, 75], [173, 220, 48], [216, 226, 25], [253, 231, 37],
    ],
    dtype=np.float64,
)


def _viridis_lut() -> np.ndarray:
    """256 x 3 uint8 lookup table interpolated from the anchors."""
    x = np.linspace(0.0, 1.0, 256)
    xp = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
    lut = np.stack([np.interp(x, xp, _VIRIDIS_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


VIRIDIS_LUT = _viridis_lut()


def _to_numpy(array: Any) -> np.ndarray:
    """Tensor (any device) or array-like -> numpy array."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _image_to_uint8(image: Any) -> np.ndarray:
    """PIL image, HxWx3 uint8 array or [3, H, W] float tensor in [0, 1] -> HxWx3 uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = _to_numpy(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)  # CHW tensor layout
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] or [3, H, W], got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return arr


def distinct_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated colors (golden-ratio hue steps, deterministic)."""
    colors = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.75  # alternate brightness so neighbours in hue differ more
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def class_colors(meta: DatasetMeta) -> np.ndarray:
    """``[num_classes, 3]`` uint8 colors by train id: the categories' own, or generated ones.

    Generated colors are used when the categories carry no colors (all black, the ``CategoryInfo``
    default) or when several classes share a color, since the picture would then be ambiguous.
    """
    colors = [tuple(c) for c in meta.colors]
    if all(c == (0, 0, 0) for c in colors) or len(set(colors)) < len(colors):
        colors = distinct_colors(meta.num_classes)
    return np.array(colors, dtype=np.uint8).reshape(-1, 3)


def _instance_shade(color: np.ndarray, instance: int) -> np.ndarray:
    """A deterministic variation of ``color`` for instance number ``instance`` (>= 1).

    The shade mixes the class color toward white or black (keeping its hue recognisable), with the
    amount drawn from a generator seeded by the instance number, so a picture is reproducible.
    """
    amount = np.random.default_rng(instance).uniform(-0.45, 0.45)
    base = color.astype(np.float64)
    target = 255.0 if amount > 0 else 0.0
    return np.round(base + abs(amount) * (target - base)).astype(np.uint8)


def _boundaries(label_map: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from their right or lower neighbour (both sides marked)."""
    edge = np.zeros(label_map.shape, dtype=bool)
    dx = label_map[:, 1:] != label_map[:, :-1]
    dy = label_map[1:, :] != label_map[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def legend_entries(label_map: Any, meta: DatasetMeta) -> list[tuple[str, tuple[int, int, int]]]:
    """(class name, color) of the classes present in ``label_map``, in train-id order."""
    labels = _to_numpy(label_map)
    train_ids = np.unique(labels // meta.label_divisor)
    colors = class_colors(meta)
    return [
        (meta.class_names[t], tuple(int(v) for v in colors[t]))  # type: ignore[misc]
        for t in train_ids
        if 0 <= t < meta.num_classes
    ]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` px (the bitmap default where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _draw_legend(entries: Sequence[tuple[str, tuple[int, int, int]]], width: int) -> Image.Image:
    """A white panel ``width`` px wide listing ``entries`` as swatch + name, flowing in rows."""
    font_size = max(11, width // 90)  # readable on both 97 px and 2048 px wide images
    font = _font(font_size)
    pad = max(3, font_size // 3)
    swatch = font_size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = []
    for name, color in entries:
        left, top, right, bottom = measure.textbbox((0, 0), name, font=font)
        items.append((name, color, swatch + pad + (right - left) + 2 * pad))
    # lay the entries out left to right, wrapping to a new row when the width runs out
    rows: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    used = pad
    for item in items:
        if rows[-1] and used + item[2] > width:
            rows.append([])
            used = pad
        rows[-1].append(item)
        used += item[2]
    row_height = swatch + 2 * pad
    panel = Image.new("RGB", (width, max(1, len(rows)) * row_height + pad), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for r, row in enumerate(rows):
        x, y = pad, pad + r * row_height
        for name, color, item_width in row:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=color, outline=(0, 0, 0))
            draw.text((x + swatch + pad, y + swatch // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
            x += item_width
    return panel


def overlay_panoptic(
    image: Any,
    label_map: Any,
    meta: DatasetMeta,
    alpha: float = 0.5,
    legend: bool = True,
    contour_color: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Blend a panoptic label map (``train_id * divisor + instance``, void left unpainted) over ``image``.

    Stuff classes take their class color; each thing instance a deterministic shade of its class
    color; segment boundaries are drawn in ``contour_color``. With ``legend`` a panel listing the
    classes present is appended below the image, so the picture is ``W`` wide and taller than ``H``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = _image_to_uint8(image)
    labels = _to_numpy(label_map).astype(np.int64)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"label map of shape {labels.shape} does not match the image size {rgb.shape[:2]}")
    colors = class_colors(meta)
    painted = np.zeros_like(rgb)
    valid = np.zeros(labels.shape, dtype=bool)
    for label in np.unique(labels):
        train_id, instance = divmod(int(label), meta.label_divisor)
        if not 0 <= train_id < meta.num_classes:
            continue  # void and anything outside the metadata stay unpainted
        mask = labels == label
        color = colors[train_id] if instance == 0 else _instance_shade(colors[train_id], instance)
        painted[mask] = color
        valid |= mask
    out = rgb.astype(np.float32)
    out[valid] = (1.0 - alpha) * out[valid] + alpha * painted[valid].astype(np.float32)
    out[_boundaries(labels) & valid] = contour_color
    picture = Image.fromarray(np.round(out).astype(np.uint8), mode="RGB")
    if not legend:
        return picture
    entries = legend_entries(labels, meta)
    if not entries:
        return picture
    panel = _draw_legend(entries, picture.width)
    canvas = Image.new("RGB", (picture.width, picture.height + panel.height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(panel, (0, picture.height))
    return canvas


def center_heatmap_image(
    center: Any,
    vmax: float = 1.0,
    centers: Sequence[Sequence[float]] | None = None,
) -> Image.Image:
    """Raw center heatmap ``[H, W]`` (or ``[1, H, W]``) as a viridis picture, clipped to ``[0, vmax]``.

    The scale is fixed (target peaks are 1.0, SPEC §2.2) so pictures of different images compare;
    detected ``centers`` given as (y, x) are marked with small red crosses.
    """
    heat = _to_numpy(center).astype(np.float64)
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise ValueError(f"expected a center heatmap [H, W] or [1, H, W], got shape {heat.shape}")
    if vmax <= 0:
        raise ValueError(f"vmax must be positive, got {vmax}")
    index = np.clip(np.nan_to_num(heat / vmax), 0.0, 1.0) * 255.0
    picture = Image.fromarray(VIRIDIS_LUT[np.round(index).astype(np.int64)], mode="RGB")
    if centers is not None:
        draw = ImageDraw.Draw(picture)
        arm = max(2, min(picture.size) // 40)
        for y, x in centers:
            draw.line([x - arm, y, x + arm, y], fill=(255, 0, 0), width=1)
            draw.line([x, y - arm, x, y + arm], fill=(255, 0, 0), width=1)
    return picture


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) -> RGB uint8 ``[..., 3]``."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [
        np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    ]
    rgb = np.zeros(h.shape + (3,), dtype=np.float64)
    for k, c in enumerate(choices):
        rgb[i == k] = c[i == k]
    return np.round(rgb * 255.0).astype(np.uint8)


def _offset_colors(dy: np.ndarray, dx: np.ndarray, max_magnitude: float) -> np.ndarray:
    """Hue = direction of (dy, dx) (red = pointing right), value = magnitude / max_magnitude."""
    hue = (np.arctan2(-dy, dx) / (2 * np.pi)) % 1.0  # -dy: image y points down, angles counter-clockwise
    value = np.clip(np.hypot(dy, dx) / max_magnitude, 0.0, 1.0)
    return _hsv_to_rgb(hue, np.ones_like(hue), value)


def offset_field_image(offset: Any, max_magnitude: float | None = None, key: bool = True) -> Image.Image:
    """Offset field ``[2, H, W]`` (dy, dx) as a color-wheel picture.

    Hue gives the direction a pixel points to (toward its instance center), brightness the length,
    saturating at ``max_magnitude`` (default: the 99th percentile of non-zero lengths, so a few
    outliers do not darken everything). With ``key`` a small color wheel in the top-right corner
    shows the mapping.
    """
    field = _to_numpy(offset).astype(np.float64)
    if field.ndim != 3 or field.shape[0] != 2:
        raise ValueError(f"expected an offset field [2, H, W], got shape {field.shape}")
    dy, dx = np.nan_to_num(field[0]), np.nan_to_num(field[1])
    if max_magnitude is None:
        lengths = np.hypot(dy, dx)
        nonzero = lengths[lengths > 1e-6]
        max_magnitude = float(np.percentile(nonzero, 99)) if nonzero.size else 1.0
    if max_magnitude <= 0:
        raise ValueError(f"max_magnitude must be positive, got {max_magnitude}")
    rgb = _offset_colors(dy, dx, max_magnitude)
    height, width = dy.shape
    radius = int(min(height, width) * 0.12)
    if key and radius >= 6:
        radius = min(radius, 48)
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float64)
        inside = np.hypot(yy, xx) <= radius
        wheel = _offset_colors(yy, xx, float(radius))
        margin = 2
        y0, x0 = margin, width - margin - (2 * radius + 1)
        region = rgb[y0 : y0 + 2 * radius + 1, x0 : x0 + 2 * radius + 1]
        region[inside] = wheel[inside]
        # a thin white ring separates the key from the field underneath
        ring = (np.hypot(yy, xx) > radius - 1) & inside
        region[ring] = 255
    return Image.fromarray(rgb, mode="RGB")


def save_pictures(image: Any, result: Any, meta: DatasetMeta, out_dir: str | os.PathLike[str], stem: str) -> list[Path]:
    """Write ``stem_overlay.png``, ``stem_center.png`` and ``stem_offset.png`` of a ``PanopticResult``.

    Returns the paths written, in that order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = {
        "overlay": overlay_panoptic(image, result.label_map, meta),
        "center": center_heatmap_image(result.center, centers=result.centers.tolist()),
        "offset": offset_field_image(result.offset),
    }
    paths = []
    for kind, picture in pictures.items():
        path = out / f"{stem}_{kind}.png"
        picture.save(path)
        paths.append(path)
    return paths
