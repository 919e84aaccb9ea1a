"""Host-side index tables that let the vision tower run on fixed-size, padded patch rows.

Hugging Face runs the Qwen2.5-VL tower on one flat sequence of all images' patches and cuts it
with `cu_seqlens` lists whose lengths depend on the data. To compile once, every sample here
has a fixed row of P = max_patches patches (its images' patches in processor order, then zero
padding), and the data-dependent structure becomes integer tables computed on the host with
numpy, once per sample, in the input pipeline:

- the window permutation of merged units (HF `get_vision_window_index`, offset per image);
- the (h, w) rotary position of each patch (HF `get_vision_position_ids`);
- segment ids that turn HF's `cu_seqlens` (one segment per image frame) and
  `cu_window_seqlens` (one per attention window) into block-diagonal masks:
  query i may attend key j iff seg[i] == seg[j] > 0.

A "unit" is one 2x2 group of patches that the merger folds into one LLM token; the processor
already emits each unit's 4 patches consecutively, so permutations act on whole units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from atlas_jax.model.config import VisionConfig

Grid = tuple[int, int, int]
# The arrays `vision_layout` returns, in every batch next to `pixel_values`.
LAYOUT_KEYS = ("window_index", "rope_hw", "full_segments", "window_segments", "unit_valid")


def _check_grid(grid: Sequence[int], i: int, merge: int) -> tuple[int, int, int]:
    if len(grid) != 3:
        raise ValueError(f"grid_thw[{i}]={tuple(grid)}: expected (t, h, w) patch counts")
    t, h, w = (int(g) for g in grid)
    if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
        raise ValueError(
            f"grid_thw[{i}]=({t}, {h}, {w}): expected t >= 1 and h, w positive multiples of "
            f"spatial_merge_size={merge}"
        )
    return t, h, w


def _image_windows(t: int, lh: int, lw: int, win: int) -> list[np.ndarray]:
    """Unit indices (image-local, HF order) of each non-empty attention window, in window order.

    Windows tile each frame's lh x lw unit grid in row-major blocks of win x win units; edge
    windows are partial (HF pads the grid with -100 and drops the pads).
    """
    units = np.arange(t * lh * lw).reshape(t, lh, lw)
    windows = []
    for f in range(t):
        for r0 in range(0, lh, win):
            for c0 in range(0, lw, win):
                block = units[f, r0 : r0 + win, c0 : c0 + win].reshape(-1)
                if block.size:
                    windows.append(block)
    return windows


def vision_layout(grid_thw: Sequence[Grid], cfg: VisionConfig, max_patches: int) -> dict[str, np.ndarray]:
    """Index tables for ONE sample whose images have patch grids `grid_thw` (HF order).

    Returns (P = max_patches, U = P // merge_unit):
      window_index   int32[U]    window-order position -> HF-order unit; padding units last;
      rope_hw        int32[P, 2] (h, w) rotary position of each patch, HF order; 0 for padding;
      full_segments  int32[P]    window order; 1-based image-frame id, 0 = padding;
      window_segments int32[P]   window order; 1-based attention-window id, 0 = padding;
      unit_valid     bool[U]     HF order; the unit holds real patches.
    """
    m, mu = cfg.spatial_merge_size, cfg.merge_unit
    if max_patches <= 0 or max_patches % mu:
        raise ValueError(f"max_patches={max_patches}: expected a positive multiple of merge_unit={mu}")
    grids = [_check_grid(g, i, m) for i, g in enumerate(grid_thw)]
    n_patches = sum(t * h * w for t, h, w in grids)
    if n_patches > max_patches:
        raise ValueError(
            f"images with grid_thw={[tuple(g) for g in grids]} have {n_patches} patches, more than "
            f"max_patches={max_patches}; raise max_patches or lower the image resolution (max_pixels)"
        )
    win = cfg.window_size // m // cfg.patch_size  # window side in merged units
    if win < 1:
        raise ValueError(
            f"window_size={cfg.window_size} is smaller than one merged unit "
            f"(spatial_merge_size * patch_size = {m * cfg.patch_size})"
        )
    n_units, total_units = n_patches // mu, max_patches // mu

    window_index = np.empty(total_units, np.int32)
    unit_frame = np.zeros(total_units, np.int32)  # HF order
    unit_window = np.zeros(total_units, np.int32)  # HF order
    rope_hw = np.zeros((max_patches, 2), np.int32)
    pos, unit0, frame0, window0, patch0 = 0, 0, 0, 0, 0
    for t, h, w in grids:
        lh, lw = h // m, w // m
        windows = _image_windows(t, lh, lw, win)
        for wi, block in enumerate(windows):
            window_index[pos : pos + block.size] = block + unit0
            unit_window[block + unit0] = window0 + wi + 1
            pos += block.size
        window0 += len(windows)
        frames = np.repeat(np.arange(t), lh * lw)
        unit_frame[unit0 : unit0 + t * lh * lw] = frame0 + frames + 1
        # Patches come in merge blocks: (row block, col block, row in block, col in block).
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hh = hh.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        rope_hw[patch0 : patch0 + t * h * w] = np.tile(np.stack([hh, ww], -1), (t, 1))
        unit0 += t * lh * lw
        frame0 += t
        patch0 += t * h * w
    window_index[n_units:] = np.arange(n_units, total_units)

    full_segments = np.repeat(unit_frame[window_index], mu).astype(np.int32)
    window_segments = np.repeat(unit_window[window_index], mu).astype(np.int32)
    return {
        "window_index": window_index,
        "rope_hw": rope_hw,
        "full_segments": full_segments,
        "window_segments": window_segments,
        "unit_valid": np.arange(total_units) < n_units,
    }


def batch_vision_layout(
    grids_per_sample: Sequence[Sequence[Grid]], cfg: VisionConfig, max_patches: int
) -> dict[str, np.ndarray]:
    """`vision_layout` of each sample, stacked along a leading batch axis [B, ...]."""
    layouts = []
    for b, grids in enumerate(grids_per_sample):
        try:
            layouts.append(vision_layout(grids, cfg, max_patches))
        except ValueError as e:
            raise ValueError(f"sample {b}: {e}") from e
    if not layouts:
        raise ValueError("batch_vision_layout: grids_per_sample is empty; expected at least one sample")
    return {k: np.stack([lay[k] for lay in layouts]) for k in layouts[0]}
