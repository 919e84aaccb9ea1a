"""Image preprocessing equals transformers' Qwen2-VL image processor (PIL backend).

The reference is `Qwen2VLImageProcessorPil`, the PIL/numpy backend of HF's Qwen2-VL processor.
It is the class `Qwen2VLImageProcessor` (and `AutoImageProcessor`) resolves to when torchvision
is absent, and torchvision is deliberately not installed here (torch is a CPU-only test
dependency for the model parity tests; the torchvision backend would only add a second resize
implementation to agree with). This library resizes with PIL exactly as that backend does.

Real photographs: every one available offline in the installed packages, nothing downloaded
(`offline_photos`: matplotlib's bundled sample JPEGs, a `test` extra; scipy.datasets' `face` when
its cache already holds it; Pillow's test images when installed with them), each cut and scaled
to assorted sizes and aspect ratios, from tiny images that hit min_pixels to huge ones that hit
max_pixels, including 200:1 strips, other colour modes and lossy re-encodings. matplotlib's real
measurement rasters (an MRI slice, elevation maps) and RGBA artwork cover greyscale and alpha.
"""

import bz2
import glob
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


def offline_photos() -> dict[str, Image.Image]:
    """Every real photograph available offline in the installed packages, by name (never downloads)."""
    matplotlib = pytest.importorskip("matplotlib")
    paths = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "sample_data", "*.jp*g")))
    pil_tests = os.path.join(os.path.dirname(Image.__file__), os.pardir, "Tests", "images")
    paths += sorted(glob.glob(os.path.join(pil_tests, "hopper.jp*g")))  # Pillow's own test photo, if shipped
    photos = {}
    for path in paths:
        with Image.open(path) as im:
            im.load()
            photos[os.path.basename(path)] = im.convert("RGB") if im.mode != "RGB" else im.copy()
    # scipy.datasets.face(): only from an existing cache (its download needs pooch and a network).
    face = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "scipy-data", "face.dat")
    if os.path.exists(face):
        with open(face, "rb") as f:
            photos["scipy face"] = Image.fromarray(np.frombuffer(bz2.decompress(f.read()), np.uint8).reshape(768, 1024, 3))
    assert "grace_hopper.jpg" in photos, "matplotlib's sample photograph is missing (install the test extra)"
    return photos


def _aspect_crop(photo, aw, ah, where):
    """The largest crop of aspect aw:ah, slid to `where` in [0, 1] along the free axis."""
    w, h = photo.size
    cw, ch = (w, round(w * ah / aw)) if w * ah <= h * aw else (round(h * aw / ah), h)
    x, y = round((w - cw) * where), round((h - ch) * where)
    return photo.crop((x, y, x + cw, y + ch))


def _jpeg(im, quality):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def _alpha_ramp(photo):
    rgba = photo.convert("RGBA")
    w, h = photo.size
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))))
    return rgba


SMALL_BOUNDS = ImageProcessorConfig(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)
PHOTO_VARIANTS = {
    "native": lambda p: p,
    **{f"aspect {aw}:{ah}": (lambda p, aw=aw, ah=ah, k=k: _aspect_crop(p, aw, ah, (k % 3) / 2))
       for k, (aw, ah) in enumerate([(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 1), (1, 3), (8, 1), (1, 8)])},
    "strip 3 rows": lambda p: p.crop((0, p.height // 2, p.width, p.height // 2 + 3)),
    "strip 3 columns": lambda p: p.crop((p.width // 3, 0, p.width // 3 + 3, p.height)),
    "wide 200:1": lambda p: _aspect_crop(p, 8, 1, 0.5).resize((4000, 20), Image.BICUBIC),
    "tall 1:195": lambda p: _aspect_crop(p, 1, 8, 0.5).resize((20, 3900), Image.BICUBIC),
    "tiny 7x5": lambda p: p.crop((200, 150, 207, 155)),
    "tiny 16x16": lambda p: p.crop((100, 300, 116, 316)),
    "tiny 33x21": lambda p: p.crop((100, 100, 133, 121)),
    "small 55x40": lambda p: p.resize((55, 40), Image.LANCZOS),
    "huge 2600x3000": lambda p: p.resize((2600, 3000), Image.BICUBIC),
    "huge wide 5000x800": lambda p: _aspect_crop(p, 6, 1, 0.3).resize((5000, 800), Image.BICUBIC),
    "odd 377x241 jpeg q70": lambda p: _jpeg(p.resize((377, 241)), 70),
    "odd 999x13 jpeg q30": lambda p: _jpeg(_aspect_crop(p, 8, 1, 1.0).resize((999, 13)), 30),
    "grey L": lambda p: p.convert("L"),
    "RGBA alpha ramp": _alpha_ramp,
    "CMYK": lambda p: p.convert("CMYK"),
    "palette P": lambda p: p.convert("P", palette=Image.ADAPTIVE, colors=64),
    "16-bit grey": lambda p: p.convert("I;16"),
}


@pytest.mark.parametrize("variant", list(PHOTO_VARIANTS))
def test_real_photographs_match_hf(variant):
    for name, photo in offline_photos().items():
        img = PHOTO_VARIANTS[variant](photo)
        for cfg in (ImageProcessorConfig(), SMALL_BOUNDS) if variant in ("native", "aspect 16:9", "small 55x40") else (ImageProcessorConfig(),):
            try:
                assert_matches_hf(img, cfg)
            except AssertionError as e:
                raise AssertionError(f"{name}, {variant} ({img.mode} {img.size}), {cfg}: {e}") from None


def test_photo_variants_cover_the_resize_regimes():
    """The variants above really reach min_pixels, max_pixels, both aspect extremes and many grids."""
    photo = offline_photos()["grace_hopper.jpg"]
    cfg = ImageProcessorConfig()
    sizes = {v: make(photo).size for v, make in PHOTO_VARIANTS.items()}
    grids = {v: image_grid(w, h, cfg) for v, (w, h) in sizes.items()}
    area = {v: g[1] * g[2] * cfg.patch_size**2 for v, g in grids.items()}
    assert any(w * h < cfg.min_pixels and area[v] >= cfg.min_pixels for v, (w, h) in sizes.items())
    assert any(w * h > cfg.max_pixels and area[v] <= cfg.max_pixels for v, (w, h) in sizes.items())
    assert max(w / h for w, h in sizes.values()) >= 150 and max(h / w for w, h in sizes.values()) >= 150
    assert len(set(grids.values())) >= 20


def test_real_scans_elevation_maps_and_rgba_artwork_match_hf():
    # matplotlib's MRI slice: 256x256 big-endian uint16 -> 8-bit greyscale.
    with gzip.open(matplotlib_sample("s1045.ima.gz")) as f:
        scan = np.frombuffer(f.read(), ">u2").reshape(256, 256).astype(np.float64)
    assert_matches_hf(Image.fromarray((scan * 255 / scan.max()).astype(np.uint8), mode="L"))
    assert_matches_hf(Image.fromarray(scan.astype(np.uint16)))  # the raw 16-bit values, mode I;16
    assert_matches_hf(Image.open(matplotlib_sample("Minduka_Present_Blue_Pack.png")))  # RGBA drawing
    assert_matches_hf(Image.open(matplotlib_sample("logo2.png")))  # RGBA logo, wide
    # Elevation maps: 16-bit integers (metres) and floats (metres, negative below sea level).
    elevation = np.load(matplotlib_sample("jacksboro_fault_dem.npz"))["elevation"]
    assert_matches_hf(Image.fromarray(elevation.astype(np.uint16)))
    topo = np.load(matplotlib_sample("topobathy.npz"))["topo"]
    assert_matches_hf(Image.fromarray(topo.astype(np.float32)))
    assert_matches_hf(Image.fromarray(((topo - topo.min()) * 255 / np.ptp(topo)).astype(np.uint8)))


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
