"""Image preprocessing equals transformers' Qwen2-VL image processor (PIL backend).

The reference is `Qwen2VLImageProcessorPil`, the class `Qwen2VLImageProcessor` resolves to when
torchvision is absent (it is, on purpose). Real photographs come from matplotlib's bundled
sample data (a `test` extra).
"""

import gzip
import io
import os

import numpy as np
import pytest
from PIL import Image

from atlas_jax.data.image_processing import (
    ImageError,
    ImageProcessorConfig,
    image_grid,
    num_image_tokens,
    preprocess_image,
    preprocess_images,
)

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLImageProcessorPil  # noqa: E402


def hf_processor(cfg: ImageProcessorConfig = ImageProcessorConfig()):
    return Qwen2VLImageProcessorPil(
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        merge_size=cfg.merge_size,
    )


def assert_matches_hf(img, cfg=ImageProcessorConfig()):
    pv, grid = preprocess_image(img, cfg)
    ref = hf_processor(cfg)(images=[img])
    ref_pv, ref_grid = np.asarray(ref["pixel_values"]), np.asarray(ref["image_grid_thw"])
    assert tuple(ref_grid[0]) == grid
    assert pv.dtype == np.float32 and pv.shape == ref_pv.shape
    np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)
    return pv, grid


def random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    x = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(x[..., 0] if channels == 1 else x, mode=mode)


def smooth_image(w, h):
    """Gradients + shapes: content where bicubic resampling differs from nearest."""
    yy, xx = np.mgrid[0:h, 0:w]
    x = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(x.astype(np.uint8))


@pytest.mark.parametrize(
    "w,h",
    [(56, 56), (64, 48), (300, 200), (1, 1), (5, 7), (27, 29), (20, 3000), (3000, 16), (1500, 1200), (999, 13)],
)
def test_synthetic_sizes_match_hf(w, h):
    assert_matches_hf(random_image(w, h, seed=w * 7 + h))


def test_smooth_image_and_custom_pixel_bounds_match_hf():
    cfg = ImageProcessorConfig(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)
    for w, h in [(100, 90), (640, 480), (2000, 300)]:
        _, (t, gh, gw) = assert_matches_hf(smooth_image(w, h), cfg)
        assert cfg.min_pixels <= gh * gw * 14 * 14 <= cfg.max_pixels


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA"])
def test_modes_match_hf(mode):
    assert_matches_hf(random_image(90, 70, mode=mode, seed=3))


def test_transparency_composited_on_white():
    # Fully transparent red must become white, as in HF (a plain convert("RGB") would keep red).
    img = Image.new("RGBA", (56, 56), (255, 0, 0, 0))
    pv, _ = assert_matches_hf(img)
    cfg = ImageProcessorConfig()
    white = (1.0 - np.asarray(cfg.image_mean)) / np.asarray(cfg.image_std)
    np.testing.assert_allclose(pv.reshape(-1, 3, 2 * 14 * 14)[0, :, 0], white, atol=1e-5)


def test_palette_with_transparency_matches_hf():
    img = random_image(60, 40, seed=5).convert("P")
    img.info["transparency"] = 0
    assert_matches_hf(img)


def matplotlib_sample(name):
    matplotlib = pytest.importorskip("matplotlib")
    return os.path.join(matplotlib.get_data_path(), "sample_data", name)


def test_real_photographs_match_hf():
    photo = Image.open(matplotlib_sample("grace_hopper.jpg"))  # a 512x600 JPEG photograph
    photo.load()
    variants = [
        photo,  # native size
        photo.crop((0, 0, 512, 160)),  # wide strip
        photo.crop((200, 0, 260, 600)),  # tall strip
        photo.crop((100, 100, 133, 121)),  # tiny: upscaled to min_pixels
        photo.resize((1800, 2100)),  # large: shrunk to max_pixels
    ]
    # Re-encoded as a lossy JPEG at another size, then decoded, as a record would be.
    buf = io.BytesIO()
    photo.resize((377, 241)).save(buf, format="JPEG", quality=70)
    variants.append(Image.open(io.BytesIO(buf.getvalue())))
    grids = {assert_matches_hf(im)[1] for im in variants}
    assert len(grids) == len(variants)  # assorted sizes really exercise different grids


def test_real_grayscale_scan_and_rgba_artwork_match_hf():
    # matplotlib's MRI slice: 256x256 big-endian uint16 -> 8-bit greyscale.
    with gzip.open(matplotlib_sample("s1045.ima.gz")) as f:
        scan = np.frombuffer(f.read(), ">u2").reshape(256, 256).astype(np.float64)
    assert_matches_hf(Image.fromarray((scan * 255 / scan.max()).astype(np.uint8), mode="L"))
    assert_matches_hf(Image.open(matplotlib_sample("Minduka_Present_Blue_Pack.png")))  # RGBA drawing


def test_patch_layout_is_channel_temporal_row_col():
    # Independent of HF: a constant-per-channel image gives each channel's value over a
    # contiguous 2*14*14 block, and the two temporal copies are equal.
    img = Image.new("RGB", (56, 84), (10, 120, 250))
    pv, grid = preprocess_image(img)
    assert grid == (1, 6, 4)
    cfg = ImageProcessorConfig()
    expected = (np.array([10, 120, 250]) / 255 - np.asarray(cfg.image_mean)) / np.asarray(cfg.image_std)
    blocks = pv.reshape(24, 3, 2, 14, 14)
    np.testing.assert_allclose(blocks, np.broadcast_to(expected[None, :, None, None, None], blocks.shape), atol=1e-6)


def test_merge_window_order():
    # Patch rows come in 2x2 merge windows: the first four rows are patches (0,0),(0,1),(1,0),(1,1).
    x = np.zeros((56, 84, 3), np.uint8)
    for r in range(4):
        for c in range(6):
            x[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = 10 * r + c
    pv, grid = preprocess_image(Image.fromarray(x))
    assert grid == (1, 4, 6)
    cfg = ImageProcessorConfig()
    vals = np.rint((pv[:, 0] * cfg.image_std[0] + cfg.image_mean[0]) * 255).astype(int)
    assert vals[:8].tolist() == [0, 1, 10, 11, 2, 3, 12, 13]


def test_grid_helpers_and_token_count():
    for w, h in [(300, 200), (1, 1), (20, 3000)]:
        _, grid = preprocess_image(random_image(w, h))
        assert image_grid(w, h) == grid
        assert num_image_tokens(grid) == grid[0] * grid[1] * grid[2] // 4
    pv, grids = preprocess_images([random_image(56, 56), random_image(300, 200)])
    ref = hf_processor()(images=[random_image(56, 56), random_image(300, 200)])
    np.testing.assert_array_equal(grids, np.asarray(ref["image_grid_thw"]))
    np.testing.assert_allclose(pv, np.asarray(ref["pixel_values"]), atol=1e-5)


def test_too_elongated_raises_like_hf():
    img = random_image(201, 1)
    with pytest.raises(ImageError, match=r"201x1 .*aspect ratio 201"):
        preprocess_image(img)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_processor()(images=[img])
    assert_matches_hf(random_image(200, 1))  # the boundary is still accepted by both


def test_empty_image_raises():
    with pytest.raises(ImageError, match=r"0x5 pixels"):
        preprocess_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="too small"):
        preprocess_image(random_image(10, 10), ImageProcessorConfig(min_pixels=0))


def test_config_validation():
    with pytest.raises(ValueError, match="max_pixels"):
        ImageProcessorConfig(min_pixels=10_000, max_pixels=5_000)
