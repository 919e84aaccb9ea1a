"""Heat-map drawing: the upsampled image under the attention, the title and question rows, and
the index page that shows each map beside its question and completion."""

import json
import re

import numpy as np
from PIL import Image

from atlas_jax import heatmaps


def _image():
    px = np.full((28, 28, 3), 255, np.uint8)
    px[:14, :14] = (220, 40, 40)  # the top-left merged token's 14x14 block is red
    return Image.fromarray(px)


def test_overlay_upsamples_and_puts_the_attention_where_it_was():
    attn = np.array([0.0, 0.0, 0.0, 1.0])  # all on the bottom-right merged token (a 2x2 patch grid, merge 2)
    out = heatmaps.overlay(_image(), attn, (1, 2, 2), merge=1, scale=3, title="<|Shape|>")
    assert out.size == (84, 84 + 14)  # 3x the image, under one title row
    body = np.asarray(out)[14:].astype(int)
    bright, dark = body[60, 60], body[10, 60]  # bottom-right vs top-right block, both white underneath
    assert bright.sum() > dark.sum() + 100
    assert np.asarray(heatmaps.upsample(_image(), 3))[43, 43].tolist() == [255, 255, 255]
    assert np.asarray(heatmaps.upsample(_image(), 3))[0, 41].tolist() == [220, 40, 40]


def test_strip_wraps_a_long_caption_above_the_panels():
    panels = [heatmaps.upsample(_image(), 3)] * 2
    caption = "Q: " + "how many red objects are inside the black rectangle? " * 3
    out = heatmaps.strip(panels, caption=caption)
    rows = (out.height - 84) // 14
    assert out.width == 84 * 2 + 4 and rows >= 3 and out.height == 84 + 14 * rows
    assert heatmaps.strip(panels).size == (172, 84)


def test_index_page_lists_each_map_beside_its_text(tmp_path):
    entry = {"png": "sft_00_shape_count.png", "title": "sft #0", "question": "How many <red> objects?", "answer": "3",
             "correct": True, "completion": "I outline <|Shape|> ... \\boxed{3}"}
    heatmaps.add_to_index(str(tmp_path), [entry])
    heatmaps.add_to_index(str(tmp_path), [dict(entry, png="rl_00_line_side.png", correct=False)])
    heatmaps.add_to_index(str(tmp_path), [dict(entry, completion="replaced")])  # the same png: replaced, not repeated
    page = (tmp_path / "index.html").read_text()
    assert re.findall(r'<img src="([^"]+)">', page) == ["rl_00_line_side.png", "sft_00_shape_count.png"]
    assert "How many &lt;red&gt; objects?" in page and "replaced" in page and "&lt;|Shape|&gt;" in page
    assert [e["png"] for e in json.loads((tmp_path / "index.json").read_text())] == ["rl_00_line_side.png", "sft_00_shape_count.png"]
