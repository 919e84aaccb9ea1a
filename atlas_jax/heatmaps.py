"""PNG heat maps of where a visual-operation module looked: its attention over the merged image
tokens, upsampled onto the image (PIL only, no plotting library)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# A perceptually ordered colour ramp (dark blue -> green -> yellow), sampled at 5 stops.
_RAMP = np.array([[48, 18, 59], [40, 120, 190], [30, 190, 120], [200, 220, 50], [250, 250, 30]], np.float32)


def colorize(values_hw: np.ndarray) -> np.ndarray:
    """float[H, W] in [0, 1] -> uint8[H, W, 3]."""
    x = np.clip(values_hw, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    t = (x - lo)[..., None]
    return ((1 - t) * _RAMP[lo] + t * _RAMP[hi]).astype(np.uint8)


def overlay(image: Image.Image, attn_p: np.ndarray, grid_thw, *, merge: int = 2, alpha: float = 0.55, title: str = "") -> Image.Image:
    """The image with the attention over its merged tokens blended on top.

    attn_p: float[P'] attention over this image's merged tokens (row-major over the merged grid
    (h / merge, w / merge) of `grid_thw` = (t, h, w) patches, first frame).
    """
    _, h, w = (int(g) for g in grid_thw)
    gh, gw = h // merge, w // merge
    a = np.asarray(attn_p[: gh * gw], np.float32).reshape(gh, gw)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)  # contrast within the image
    heat = Image.fromarray(colorize(a)).resize(image.size, Image.NEAREST)
    out = Image.blend(image.convert("RGB"), heat, alpha)
    if title:
        canvas = Image.new("RGB", (out.width, out.height + 14), "white")
        canvas.paste(out, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), title, fill="black")
        out = canvas
    return out


def strip(panels: list[Image.Image]) -> Image.Image:
    """Panels side by side."""
    height = max(p.height for p in panels)
    out = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 4
    return out
