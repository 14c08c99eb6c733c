"""Phi-3.5-vision image preprocessing: the HD transform, as a handful of pure functions.

An image of any size becomes a *global* 336x336 thumbnail plus a grid of 336x336 *crops*:

    640x480 photo, num_crops=4
      -> resize (PIL bilinear) so the long side is s*336 with s*ceil(s/ratio) <= num_crops: 672x504
      -> pad the short side with white to a multiple of 336, centered:                       672x672
      -> normalize (CLIP mean/std), cut row-major into h_c x w_c = 2x2 crops
      -> global view = bicubic resize of the normalized canvas to 336x336
      -> pixel_values (num_crops + 1, 3, 336, 336): [global, crop_1..crop_4, zero padding...]

The model turns that into (h_c*w_c + 1)*144 + 1 + (h_c + 1)*12 image tokens (757 here). Every number above is
what the official processor computes; `num_image_tokens` reproduces it from the image size alone.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v.common.hub import resolve_file

CROP = 336
TOKENS_PER_CROP = 144  # 24x24 CLIP patches merged 2x2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hd_sizes(width: int, height: int, num_crops: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Sizes of the HD transform: the resize target and the white-padded canvas, both as (width, height).

    >>> hd_sizes(640, 480, 4)
    ((672, 504), (672, 672))
    >>> hd_sizes(500, 2000, 4)
    ((336, 1344), (336, 1344))
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    transposed = width < height  # the official code transposes portrait images and works on landscape ones
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * CROP
    new_h = max(1, int(new_w / ratio))  # the official code crashes on a 0-pixel height (e.g. 1x337 at 1 crop)
    padded_h = math.ceil(new_h / CROP) * CROP
    if transposed:
        return (new_h, new_w), (padded_h, new_w)
    return (new_w, new_h), (new_w, padded_h)


def crop_grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(rows, cols) of 336-crops for an image of this size. >>> crop_grid(2000, 500, 4)  # (1, 4)"""
    _, (padded_w, padded_h) = hd_sizes(width, height, num_crops)
    return padded_h // CROP, padded_w // CROP


def tokens_for_grid(rows: int, cols: int) -> int:
    """Image tokens for a crop grid: crops + global at 144 each, one glb_GN, a newline per merged row."""
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * 12


def num_image_tokens(width: int, height: int, num_crops: int) -> int:
    """Number of placeholder tokens for an image of this size, without touching pixels.

    >>> num_image_tokens(640, 480, 4), num_image_tokens(640, 480, 16)
    (757, 1921)
    """
    return tokens_for_grid(*crop_grid(width, height, num_crops))


def hd_resize(image: Image.Image, num_crops: int) -> Image.Image:
    """PIL bilinear resize of an RGB image to the HD size (before padding), pixel for pixel as the official code.

    The official code resizes a portrait image transposed, i.e. (PIL: horizontal pass, then vertical) vertical axis
    first; two one-axis resizes in that order give the same pixels without the two transposes.
    """
    new_w, new_h = hd_sizes(*image.size, num_crops)[0]
    if image.width < image.height:
        image = image.resize((image.width, new_h), Image.Resampling.BILINEAR)  # vertical pass only
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def hd_transform(image: Image.Image, num_crops: int) -> Image.Image:
    """Resize with PIL bilinear and pad with white to a multiple of 336 (portrait images left and right), exactly as
    the official processor."""
    resized = hd_resize(image, num_crops)
    (new_w, new_h), (padded_w, padded_h) = hd_sizes(*image.size, num_crops)
    canvas = Image.new("RGB", (padded_w, padded_h), (255, 255, 255))
    canvas.paste(resized, ((padded_w - new_w) // 2, (padded_h - new_h) // 2))
    return canvas


def normalize_into(out: torch.Tensor, image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 RGB image -> (x/255 - mean) / std into `out` (3, H, W) float32: torchvision's float32 operations (the
    same bits), x/255 straight from the uint8 plane, then -mean, /std: three passes over the plane instead of four."""
    for channel, plane in enumerate(image.split()):  # PIL splits into contiguous uint8 planes in C
        values = out[channel]
        np.divide(np.asarray(plane), np.float32(255), out=values.numpy(), dtype=np.float32)
        values.sub_(mean[channel]).div_(std[channel])
    return out


@functools.cache
def white_value(mean=CLIP_MEAN, std=CLIP_STD) -> tuple[float, float, float]:
    """A white pixel's normalized value per channel, by the same float32 operations as `normalize_into`."""
    return tuple(torch.full((3,), 255.0).div_(255).sub_(torch.tensor(mean)).div_(torch.tensor(std)).tolist())


# PyTorch's bicubic kernel (A = -0.75, align_corners=False) at an integer downscale k samples output d at input
# k*d + (k-1)/2 and reads the four taps k*d + k//2 - 2 + j, j = 0..3, clamped to the edges. At even k the sample falls
# halfway between two pixels and the weights below are exact in float32; at odd k it falls on a pixel: (0, 1, 0, 0).
HALF_WEIGHTS = (-0.09375, 0.59375, 0.59375, -0.09375)


def _along(x: torch.Tensor, dim: int, index: slice) -> torch.Tensor:
    return x[(slice(None),) * (dim % x.dim()) + (index,)]


def downscale_axis(x: torch.Tensor, k: int, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bicubic downscale of axis `dim` by the integer factor k, with the float32 operations of PyTorch's CPU kernel.

    The kernel sums the taps as t1*w1, then fma(t0, w0, .), fma(t2, w2, .), fma(t3, w3, .); `mul` and `add_(alpha=)`
    repeat that chain tap by tap over the whole axis (`_separable_is_exact` checks they fuse alike). Odd k: the middle.

    >>> downscale_axis(torch.arange(8.0), 2, 0)
    tensor([0.4062, 2.5000, 4.5000, 6.5938])
    """
    if k % 2:
        middle = _along(x, dim, slice((k - 1) // 2, None, k))
        return middle if out is None else out.copy_(middle)
    n = x.shape[dim]
    if out is None:
        out = x.new_empty(x.shape[:dim % x.dim()] + (n // k,) + x.shape[dim % x.dim() + 1:])
    n_out = out.shape[dim]
    for j in (1, 0, 2, 3):  # the kernel's order
        first = k // 2 - 2 + j  # the tap of output 0; of output d it is first + k*d
        lo, hi = max(0, -(first // k)), min(n_out, (n - 1 - first) // k + 1)  # outputs whose tap is inside the axis
        pieces = [(slice(lo, hi), slice(first + k * lo, first + k * (hi - 1) + 1, k)),
                  (slice(0, lo), slice(0, 1)), (slice(hi, n_out), slice(n - 1, n))]  # clamped at the edges (k = 2)
        for out_index, tap_index in pieces[:1] if lo == 0 and hi == n_out else pieces:
            target, tap = _along(out, dim, out_index), _along(x, dim, tap_index)
            if j == 1:  # never clamped
                torch.mul(tap, HALF_WEIGHTS[j], out=target)
            else:
                target.add_(tap, alpha=HALF_WEIGHTS[j])
    return out


def _outputs_reading(lo: int, hi: int, k: int) -> tuple[int, int]:
    """The outputs [a, b) of a k-fold downscale to 336 whose taps can reach inputs [lo, hi), one more on each side:
    computed on the inputs [k*a, k*b) alone, they clamp only where both the clamped and the true tap are outside."""
    return max(0, lo // k - 1), min(CROP, -(-hi // k) + 1)


def _separable_global_view(canvas: torch.Tensor, box: tuple[int, int, int, int], out: torch.Tensor) -> torch.Tensor:
    """`global_view` as two one-axis passes, W then H (the kernel's order), on the part of the canvas that can see the
    box; the outputs that read padding alone get its value, resized from a few padding pixels the same way."""
    rows, cols = canvas.shape[1] // CROP, canvas.shape[2] // CROP
    (r0, r1), (c0, c1) = _outputs_reading(*box[:2], rows), _outputs_reading(*box[2:], cols)
    if (r0, r1, c0, c1) != (0, CROP, 0, CROP):
        padding = canvas[:, -1:, -1:].repeat(1, rows, cols)  # not expand(): a stride-0 operand rounds differently
        out.copy_(downscale_axis(downscale_axis(padding, cols, -1), rows, -2))  # (3, 1, 1), broadcast
    wide = downscale_axis(canvas[:, rows * r0:rows * r1, cols * c0:cols * c1], cols, -1)  # (3, rows*(r1-r0), c1-c0)
    downscale_axis(wide, rows, -2, out=out[:, r0:r1, c0:c1])
    return out


@functools.cache
def _separable_is_exact(rows: int, cols: int) -> bool:
    """Whether `_separable_global_view` gives F.interpolate's bits on this crop grid, with and without padding: true
    with PyTorch's x86 CPU kernels, promised nowhere, so checked once per grid and process on a random canvas."""
    height, width = rows * CROP, cols * CROP
    generator = torch.Generator().manual_seed(0)
    canvas = torch.randn(3, height, width, generator=generator)
    box = (5, height - 7, 3, width - 4)  # odd and even edges on both axes
    padded = torch.randn(3, 1, 1, generator=generator).repeat(1, height, width)  # random: 1.5 would hide rounding
    padded[:, box[0]:box[1], box[2]:box[3]] = canvas[:, box[0]:box[1], box[2]:box[3]]
    return all(torch.equal(_separable_global_view(x, b, torch.empty(3, CROP, CROP)),
                           F.interpolate(x[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0])
               for x, b in ((canvas, (0, height, 0, width)), (padded, box)))


def global_view(canvas: torch.Tensor, box: tuple[int, int, int, int] | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Bicubic (no antialias) resize of the *normalized* canvas (3, rows*336, cols*336) to (3, 336, 336), bit for bit
    as F.interpolate, into `out` if given.

    box = (top, bottom, left, right) of the image: outside it the canvas is the bottom-right pixel's value (the
    centered padding). Two one-axis passes on the rows the image reaches are 10-45% faster than F.interpolate, except
    at an even number of crop columns > 2, where strided reads make them slower and F.interpolate is kept.
    """
    rows, cols = canvas.shape[1] // CROP, canvas.shape[2] // CROP
    out = canvas.new_empty(3, CROP, CROP) if out is None else out
    if (cols % 2 == 0 and cols > 2) or not _separable_is_exact(rows, cols):
        return out.copy_(F.interpolate(canvas[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0])
    return _separable_global_view(canvas, box or (0, canvas.shape[1], 0, canvas.shape[2]), out)


def image_to_crops(image: Image.Image, num_crops: int, mean=CLIP_MEAN, std=CLIP_STD,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """One PIL image -> ((num_crops + 1, 3, 336, 336) float32, padded height, padded width).

    Entry 0 is the global view, then the crops, row-major, then all-zero padding crops; `out`, if given, is filled
    in place. Bit for bit `normalize(hd_transform(...))` cut up, but 1.6-2.6x as fast on one thread
    (bench/processor_throughput.py): the border is filled with its normalized value, float operations run in place,
    each crop is copied once and the global view is resized one axis at a time (`global_view`).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = hd_resize(image, num_crops)
    (new_w, new_h), (padded_w, padded_h) = hd_sizes(*image.size, num_crops)
    top, left = (padded_h - new_h) // 2, (padded_w - new_w) // 2
    canvas = torch.empty(3, padded_h, padded_w)  # (3, rows*336, cols*336)
    white = torch.tensor(white_value(mean, std)).view(3, 1, 1)
    # the border: bands above and below a landscape image, left and right of a portrait one
    canvas[:, :top] = canvas[:, top + new_h:] = white
    canvas[:, :, :left] = canvas[:, :, left + new_w:] = white
    normalize_into(canvas[:, top:top + new_h, left:left + new_w], resized, mean, std)
    rows, cols = padded_h // CROP, padded_w // CROP
    out = torch.empty(num_crops + 1, 3, CROP, CROP) if out is None else out
    global_view(canvas, (top, top + new_h, left, left + new_w), out=out[0])
    # (3, rows*336, cols*336) -> (rows, cols, 3, 336, 336) = crops 1..rows*cols, left to right, then top to bottom
    out[1:1 + rows * cols].view(rows, cols, 3, CROP, CROP).copy_(
        canvas.view(3, rows, CROP, cols, CROP).permute(1, 3, 0, 2, 4))
    out[1 + rows * cols:].zero_()
    return out, padded_h, padded_w


class Phi3VImageProcessor:
    """Reads/writes `preprocessor_config.json` and turns PIL images into `pixel_values` and `image_sizes`.

    Args:
        num_crops: maximum number of 336-crops per image (4 in the official config; 16 for single documents).
        image_mean, image_std: per-channel normalization (OpenAI CLIP values).
    """

    config_name = "preprocessor_config.json"

    def __init__(self, num_crops: int = 4, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb: bool = True,
                 num_img_tokens: int = TOKENS_PER_CROP, **extra):
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.num_crops = int(num_crops)
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.do_convert_rgb = do_convert_rgb
        self.num_img_tokens = num_img_tokens
        self.extra = {k: v for k, v in extra.items() if k not in ("image_processor_type", "processor_class")}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> Phi3VImageProcessor:
        config = json.loads(resolve_file(path, cls.config_name).read_text())
        config.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**config)

    def to_dict(self) -> dict:
        return {**self.extra, "do_convert_rgb": self.do_convert_rgb, "image_mean": list(self.image_mean),
                "image_processor_type": "Phi3VImageProcessor", "image_std": list(self.image_std),
                "num_crops": self.num_crops, "num_img_tokens": self.num_img_tokens,
                "processor_class": "Phi3VProcessor"}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / self.config_name).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    def num_image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens for an image of this size at this processor's num_crops (no pixels decoded)."""
        return num_image_tokens(width, height, self.num_crops)

    calc_num_image_tokens_from_image_size = num_image_tokens  # the official name

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor | list[int]]:
        """Returns pixel_values (N, num_crops+1, 3, 336, 336), image_sizes (N, 2) = padded (H, W), num_img_tokens."""
        images = [images] if isinstance(images, Image.Image) else images
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"images must be PIL images, got {type(image).__name__}")
        pixel_values = torch.empty(len(images), self.num_crops + 1, 3, CROP, CROP)  # filled in place, no stack
        sizes = [image_to_crops(image, self.num_crops, self.image_mean, self.image_std, out=crops)[1:]
                 for image, crops in zip(images, pixel_values)]
        return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2),
                "num_img_tokens": [tokens_for_grid(h // CROP, w // CROP) for h, w in sizes]}
