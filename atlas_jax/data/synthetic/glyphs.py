"""A tiny built-in 5x7 bitmap font (digits and capital letters).

Why not a TrueType font: `ImageFont.load_default()` is a FreeType font in recent Pillow, whose
anti-aliased rasterisation can change between FreeType builds. A bitmap font drawn as solid
rectangles gives byte-identical pixels on every machine, and stays crisp at 112 px.
"""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

GLYPH_W, GLYPH_H = 5, 7

# One string per row, '#' = ink. Drawn for this project.
_ROWS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": (".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}


def glyph(ch: str) -> np.ndarray:
    """bool[7, 5]: the ink mask of one character."""
    if ch not in _ROWS:
        raise ValueError(f"character {ch!r} is not in the built-in font; expected one of {''.join(sorted(_ROWS))}")
    return np.array([[c == "#" for c in row] for row in _ROWS[ch]], dtype=bool)


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of `text` drawn with one blank column between characters."""
    n = len(text)
    return (n * GLYPH_W + max(n - 1, 0)) * scale, GLYPH_H * scale


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill, scale: int = 1) -> None:
    """Draws `text` with its top-left corner at `xy`; each ink cell is a solid scale x scale square."""
    x0, y0 = xy
    for k, ch in enumerate(text):
        ox = x0 + k * (GLYPH_W + 1) * scale
        for r, c in zip(*np.nonzero(glyph(ch))):
            x, y = ox + int(c) * scale, y0 + int(r) * scale
            draw.rectangle((x, y, x + scale - 1, y + scale - 1), fill=fill)


def draw_text_centered(draw: ImageDraw.ImageDraw, center: tuple[float, float], text: str, fill, scale: int = 1) -> None:
    w, h = text_size(text, scale)
    draw_text(draw, (int(round(center[0] - w / 2)), int(round(center[1] - h / 2))), text, fill, scale)
