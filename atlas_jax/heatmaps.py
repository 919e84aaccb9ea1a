"""PNG heat maps of where a visual-operation module looked: its attention over the merged image
tokens, upsampled onto the image (PIL only, no plotting library), and an HTML index page that
shows each map next to its question and completion."""

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
