"""Image preprocessing identical to Hugging Face's Qwen2-VL image processor (numpy + PIL).

The reference is `transformers.Qwen2VLImageProcessorPil`, the PIL/numpy backend (it is also what
`Qwen2VLImageProcessor` / `AutoImageProcessor` fall back to when torchvision is absent). Steps:
  1. RGB: transparency is composited onto white (not dropped), other modes converted;
  2. `smart_resize`: both sides multiples of `patch_size * merge_size` (28), aspect ratio kept,
     area within [min_pixels, max_pixels]; resize with PIL bicubic on uint8 pixels;
  3. rescale by 1/255 (in float64, then float32, as HF does) and normalise with the OpenAI CLIP
     mean / std;
  4. a still image is one temporal patch: the frame is repeated `temporal_patch_size` times;
  5. patches flattened in HF's order: rows of 2x2 merge windows, each patch laid out as
     (channel, temporal, patch_row, patch_col) -> float32[h * w, 3 * 2 * 14 * 14 = 1176].

`grid_thw` is (1, h, w) in patches; the language model sees h * w / merge_size**2 image tokens.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # HF's smart_resize rejects anything more elongated


class ImageError(ValueError):
    """An image the processor cannot use (empty, or more elongated than 200:1)."""


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The Qwen2-VL processor settings (HF defaults; Qwen2.5-VL checkpoints ship the same values).

    min_pixels / max_pixels: bounds on the resized area (HF's `size.shortest_edge` / `longest_edge`).
    patch_size, temporal_patch_size, merge_size: must match the vision tower (`VisionConfig`).
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.min_pixels < 0 or self.max_pixels < max(self.min_pixels, self.factor**2):
            raise ValueError(
                f"ImageProcessorConfig: min_pixels={self.min_pixels}, max_pixels={self.max_pixels}: expected "
                f"0 <= min_pixels <= max_pixels and max_pixels >= factor**2 = {self.factor**2}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"ImageProcessorConfig: image_mean / image_std need 3 values (RGB), got "
                             f"{self.image_mean} / {self.image_std}")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merge window of patches, in pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def for_vision(cls, vision, **overrides) -> ImageProcessorConfig:
        """The config that matches a `VisionConfig` (patch sizes taken from the tower)."""
        return cls(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            **overrides,
        )


def smart_resize(height: int, width: int, cfg: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[int, int]:
    """(height, width) after resizing: multiples of `cfg.factor`, area in [min_pixels, max_pixels],
    aspect ratio as close as the grid allows. Same arithmetic as HF's `smart_resize`."""
    if height < 1 or width < 1:
        raise ImageError(f"image is {width}x{height} pixels (WxH): expected at least 1 pixel on each side")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image is {width}x{height} pixels (WxH), aspect ratio {ratio:.1f}: expected at most "
            f"{MAX_ASPECT_RATIO} (the Qwen2-VL processor rejects more elongated images)"
        )
    f = cfg.factor
    h, w = round(height / f) * f, round(width / f) * f
    if h * w > cfg.max_pixels:
        # Shrink by the exact area ratio, then round each side down so the area stays under the cap.
        beta = math.sqrt(height * width / cfg.max_pixels)
        h = max(f, math.floor(height / beta / f) * f)
        w = max(f, math.floor(width / beta / f) * f)
    elif h * w < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h = math.ceil(height * beta / f) * f
        w = math.ceil(width * beta / f) * f
    if h == 0 or w == 0:  # only reachable with min_pixels=0 and a side under factor/2
        raise ImageError(
            f"image is {width}x{height} pixels (WxH): too small, it rounds to an empty {w}x{h} grid "
            f"(each side needs >= {f / 2} pixels, or raise min_pixels)"
        )
    return h, w


def image_grid(width: int, height: int, cfg: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[int, int, int]:
    """grid_thw of an image of this size, without touching pixels (cheap length checks)."""
    h, w = smart_resize(height, width, cfg)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def num_image_tokens(grid_thw, merge_size: int = 2) -> int:
    """Image placeholder tokens the language model sees for one image: t * h * w / merge_size**2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // merge_size**2


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as HF does; a plain convert would
    show the colour hidden under transparent pixels)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess_image(
    img: Image.Image, cfg: ImageProcessorConfig = ImageProcessorConfig()
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values float32[h * w, patch_dim], grid_thw (1, h, w)).

    Raises ImageError for an empty or too elongated image (the caller names the record).
    """
    height, width = img.height, img.width
    rh, rw = smart_resize(height, width, cfg)
    rgb = to_rgb(img)
    # PIL returns a copy when the size is unchanged, so always calling resize matches HF.
    x_hwc = np.asarray(rgb.resize((rw, rh), resample=Image.Resampling.BICUBIC), dtype=np.uint8)
    # HF rescales in float64 and casts once, then normalises in float32: same order, same bits.
    x_hwc = (x_hwc.astype(np.float64) * (1 / 255)).astype(np.float32)
    x_hwc = (x_hwc - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)

    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = rh // p, rw // p
    # rows: (merge-window row, merge-window col, row in window, col in window); features: (c, t, py, px)
    x = x_hwc.reshape(gh // m, m, p, gw // m, m, p, 3)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # [gh/m, gw/m, m, m, c, py, px]
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (tp,) + x.shape[5:])
    pixel_values = np.ascontiguousarray(x).reshape(gh * gw, 3 * tp * p * p)
    return pixel_values, (1, gh, gw)


def preprocess_images(
    images, cfg: ImageProcessorConfig = ImageProcessorConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values float32[sum h*w, patch_dim], grid_thw int32[N, 3]), concatenated
    in order, like HF's `pixel_values` / `image_grid_thw` for one sample."""
    outs = [preprocess_image(im, cfg) for im in images]
    if not outs:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int32)
    return np.concatenate([o[0] for o in outs]), np.asarray([o[1] for o in outs], np.int32)
