"""PNG heat maps of where a visual-operation module looked: its attention over the merged image
tokens, upsampled onto the image (PIL only, no plotting library), and an HTML index page that
shows each map next to its question and completion; and how much of that attention lands on the
object the generator knows the token is about (`target_tokens`, `localisation`)."""

from __future__ import annotations

import html
import json
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw

_TITLE_H = 14  # px per text row (PIL's default bitmap font is 11 px tall)
_CHAR_W = 6  # px per character of that font

# A perceptually ordered colour ramp (dark blue -> green -> yellow), sampled at 5 stops.
_RAMP = np.array([[48, 18, 59], [40, 120, 190], [30, 190, 120], [200, 220, 50], [250, 250, 30]], np.float32)


def colorize(values_hw: np.ndarray) -> np.ndarray:
    """float[H, W] in [0, 1] -> uint8[H, W, 3]."""
    x = np.clip(values_hw, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    t = (x - lo)[..., None]
    return ((1 - t) * _RAMP[lo] + t * _RAMP[hi]).astype(np.uint8)


def overlay(image: Image.Image, attn_p: np.ndarray, grid_thw, *, merge: int = 2, alpha: float = 0.55, title: str = "",
            scale: int = 1) -> Image.Image:
    """The image, upsampled `scale` times (pixel-exact), with the attention over its merged tokens
    blended on top.

    attn_p: float[P'] attention over this image's merged tokens (row-major over the merged grid
    (h / merge, w / merge) of `grid_thw` = (t, h, w) patches, first frame).
    """
    image = upsample(image, scale)
    _, h, w = (int(g) for g in grid_thw)
    gh, gw = h // merge, w // merge
    a = np.asarray(attn_p[: gh * gw], np.float32).reshape(gh, gw)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)  # contrast within the image
    heat = Image.fromarray(colorize(a)).resize(image.size, Image.NEAREST)
    out = Image.blend(image.convert("RGB"), heat, alpha)
    return _captioned(out, title) if title else out


def target_tokens(box, image_size: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """bool[gh * gw], row-major over the merged-token grid (gh, gw) of an image of (width, height)
    `image_size` pixels: the tokens whose part of the image overlaps `box` = (x0, y0, x1, y1)
    (pixels, ends exclusive). Token (r, c) covers x in [c W / gw, (c + 1) W / gw) and y likewise:
    the image processor resizes the image to whole patches, scaling the box and the tokens alike.

    Why the tokens overlapping the object's box, not its quadrant: it needs no family-specific
    layout (any box, image size or grid), and for the cell-scene families at 112 px (a 4 x 4 grid
    of 28-px tokens) it IS the quadrant's 2 x 2 tokens, since every object straddles its quadrant's
    centre lines (tests/test_localisation.py checks both over many seeds)."""
    (width, height), (gh, gw) = image_size, grid_hw
    x0, y0, x1, y1 = box
    cols, rows = np.arange(gw), np.arange(gh)
    in_x = (cols * width / gw < x1) & ((cols + 1) * width / gw > x0)
    in_y = (rows * height / gh < y1) & ((rows + 1) * height / gh > y0)
    return (in_y[:, None] & in_x[None, :]).reshape(-1)


def localisation(attn_p: np.ndarray, region_p: np.ndarray) -> dict[str, float | bool]:
    """Whether one functional token's module looked at its target.

    attn_p: float[P] its head-averaged attention over one image's merged tokens (as `overlay`
    draws it); region_p: bool[P] the target's tokens (`target_tokens`). Returns
      share:  the attention mass on the region over the mass on the whole image (1: all on it);
      chance: the region's share of the image's tokens, which uniform attention gets;
      hit:    whether the most-attended token (the first, on a tie) lies in the region.
    """
    attn = np.asarray(attn_p, np.float64)
    region = np.asarray(region_p, bool)
    if attn.shape != region.shape or not region.any():
        raise ValueError(f"localisation: attention {attn.shape} and region {region.shape} must match and the "
                         f"region hold a token (got {int(region.sum())})")
    return {"share": float(attn[region].sum() / max(attn.sum(), 1e-12)), "chance": float(region.mean()),
            "hit": bool(region[int(np.argmax(attn))])}


def upsample(image: Image.Image, scale: int) -> Image.Image:
    """`scale` times larger, each pixel a block (small synthetic images stay exact)."""
    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def strip(panels: list[Image.Image], caption: str = "") -> Image.Image:
    """Panels side by side, under `caption` (wrapped to the strip's width) when given."""
    height = max(p.height for p in panels)
    out = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 4
    return _captioned(out, caption) if caption else out


def _captioned(image: Image.Image, text: str) -> Image.Image:
    lines = textwrap.wrap(text, max(8, (image.width - 4) // _CHAR_W)) or [""]
    out = Image.new("RGB", (image.width, image.height + _TITLE_H * len(lines)), "white")
    out.paste(image, (0, _TITLE_H * len(lines)))
    draw = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        draw.text((2, 1 + _TITLE_H * k), line, fill="black")
    return out


def add_to_index(directory: str, entries: list[dict]) -> str:
    """Adds `entries` (png: a file in `directory`, title, question, answer, completion, correct) to
    the directory's heat maps (index.json, replacing entries of the same png) and rewrites
    index.html from all of them: each map next to its question and completion. Returns its path."""
    kept_path = os.path.join(directory, "index.json")
    kept = {}
    if os.path.exists(kept_path):
        with open(kept_path) as f:
            kept = {e["png"]: e for e in json.load(f)}
    kept.update({e["png"]: e for e in entries})
    ordered = [kept[k] for k in sorted(kept)]
    with open(kept_path, "w") as f:
        json.dump(ordered, f, indent=1)
    rows = []
    for e in ordered:
        text = (f"<b>{html.escape(e['title'])}</b><p><b>Question:</b> {html.escape(e['question'])}</p>"
                f"<p><b>Answer:</b> {html.escape(e['answer'])} &middot; <b>correct:</b> {'yes' if e['correct'] else 'no'}</p>"
                f"<pre>{html.escape(e['completion'])}</pre>")
        rows.append(f'<tr><td><img src="{html.escape(e["png"])}"></td><td>{text}</td></tr>')
    page = os.path.join(directory, "index.html")
    with open(page, "w") as f:
        f.write("<!doctype html><meta charset='utf-8'><title>Visual-operation heat maps</title>\n"
                "<style>td{vertical-align:top;padding:6px}pre{white-space:pre-wrap;max-width:40em}</style>\n"
                "<h1>Visual-operation heat maps</h1><p>Each row: the image (upsampled) and, for each functional "
                "token, where its module attended (bright = more attention), beside the question and the completion "
                "(or, where none was generated, the reference trajectory the maps were computed on).</p>\n"
                "<table>\n" + "\n".join(rows) + "\n</table>\n")
    return page
