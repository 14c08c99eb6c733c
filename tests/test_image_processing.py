"""The HD transform against the spec's worked examples (phi3v_spec.md section 4), padding, crop order, modes."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.models.phi3_v.image_processing import (
    CROP,
    Phi3VImageProcessor,
    _separable_is_exact,
    crop_grid,
    global_view,
    hd_sizes,
    hd_transform,
    image_to_crops,
    num_image_tokens,
)
from tests.conftest import make_image

WHITE = torch.tensor([1.9303361, 2.0748837, 2.1458969])  # (1 - mean) / std, the spec's padding values

# input W, H, num_crops -> padded W, H, grid rows x cols, tokens (spec section 4 "Worked examples")
WORKED_EXAMPLES = [
    (336, 336, 4, 672, 672, 2, 2, 757), (336, 336, 16, 1344, 1344, 4, 4, 2509),
    (640, 480, 4, 672, 672, 2, 2, 757), (640, 480, 16, 1344, 1008, 3, 4, 1921),
    (480, 640, 4, 672, 672, 2, 2, 757), (480, 640, 16, 1008, 1344, 4, 3, 1933),
    (1920, 1080, 4, 672, 672, 2, 2, 757), (1920, 1080, 16, 1680, 1008, 3, 5, 2353),
    (1080, 1920, 4, 672, 672, 2, 2, 757), (1080, 1920, 16, 1008, 1680, 5, 3, 2377),
    (2000, 500, 4, 1344, 336, 1, 4, 745), (2000, 500, 16, 2688, 672, 2, 8, 2485),
    (500, 2000, 4, 336, 1344, 4, 1, 781), (500, 2000, 16, 672, 2688, 8, 2, 2557),
    (50, 8000, 4, 336, 1344, 4, 1, 781), (50, 8000, 16, 336, 5376, 16, 1, 2653),
    (100, 100, 4, 672, 672, 2, 2, 757), (100, 100, 16, 1344, 1344, 4, 4, 2509),
]


@pytest.mark.parametrize("width,height,num_crops,pad_w,pad_h,rows,cols,tokens", WORKED_EXAMPLES)
def test_worked_examples_from_size(width, height, num_crops, pad_w, pad_h, rows, cols, tokens):
    assert hd_sizes(width, height, num_crops)[1] == (pad_w, pad_h)
    assert crop_grid(width, height, num_crops) == (rows, cols)
    assert num_image_tokens(width, height, num_crops) == tokens


@pytest.mark.parametrize("width,height,num_crops,pad_w,pad_h,rows,cols,tokens",
                         [row for row in WORKED_EXAMPLES if row[0] * row[1] < 4_000_000])
def test_worked_examples_from_pixels(width, height, num_crops, pad_w, pad_h, rows, cols, tokens):
    out = Phi3VImageProcessor(num_crops=num_crops)([make_image(width, height)])
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, CROP, CROP)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_sizes"].tolist() == [[pad_h, pad_w]]  # (H, W) of the padded canvas
    assert out["num_img_tokens"] == [tokens]
    assert (out["pixel_values"][0, 1 + rows * cols:] == 0).all()  # zero padding crops
    assert (out["pixel_values"][0, : 1 + rows * cols].abs().sum(dim=(1, 2, 3)) > 0).all()


@pytest.mark.parametrize("width,height,num_crops,resized,pads", [
    (640, 480, 4, (672, 504), (84, 84)),          # vertical padding, top = floor(diff / 2)
    (1920, 1080, 4, (672, 378), (147, 147)),
    (1920, 1080, 16, (1680, 945), (31, 32)),
    (50, 8000, 4, (8, 1344), (164, 164)),         # portrait: padding ends up left / right
])
def test_white_padding_is_centered(width, height, num_crops, resized, pads):
    assert hd_sizes(width, height, num_crops)[0] == resized
    canvas = np.asarray(hd_transform(Image.new("RGB", (width, height), (0, 0, 0)), num_crops))
    white = (canvas == 255).all(axis=2)
    axis_profile = white.all(axis=1) if width >= height else white.all(axis=0)
    before, after = pads
    assert axis_profile[:before].all() and not axis_profile[before]
    assert axis_profile[len(axis_profile) - after:].all() and not axis_profile[len(axis_profile) - after - 1]


def test_white_padding_values_after_normalization():
    pixels, height, width = image_to_crops(Image.new("RGB", (640, 480), (0, 0, 0)), 4)
    top_left_crop = pixels[1]  # crop (0, 0) starts with 84 rows of padding
    assert torch.allclose(top_left_crop[:, :84, :], WHITE[:, None, None].expand(3, 84, CROP), atol=1e-6)
    assert (height, width) == (672, 672)


def test_crops_are_row_major():
    # a 3x4 grid (num_crops=16, 1344x1008 canvas) where every 336-tile has its own flat colour
    rows, cols = 3, 4
    colours = [(20 * r + 5 * c, 40 + 10 * c, 200 - 30 * r) for r in range(rows) for c in range(cols)]
    canvas = Image.new("RGB", (cols * CROP, rows * CROP))
    for k, colour in enumerate(colours):
        canvas.paste(Image.new("RGB", (CROP, CROP), colour), ((k % cols) * CROP, (k // cols) * CROP))
    pixels, height, width = image_to_crops(canvas, 16)
    assert (height, width) == (rows * CROP, cols * CROP)  # exact multiple: no resampling blur at tile centres
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    for k, colour in enumerate(colours):
        expected = (torch.tensor(colour) / 255 - mean) / std
        assert torch.allclose(pixels[1 + k][:, 168, 168], expected, atol=1e-5), k


def test_global_view_is_bicubic_of_normalized_canvas():
    image = make_image(700, 500)
    pixels, height, width = image_to_crops(image, 4)
    canvas = torch.cat([torch.cat(list(pixels[1 + r * 2: 3 + r * 2]), dim=2) for r in range(2)], dim=1)
    expected = torch.nn.functional.interpolate(canvas[None], size=(CROP, CROP), mode="bicubic", align_corners=False)
    assert torch.equal(pixels[0], expected[0])


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "LA", "1", "I;16"])
def test_modes_are_plain_rgb_converted(mode):
    image = make_image(400, 300).convert(mode)
    processor = Phi3VImageProcessor(num_crops=4)
    assert torch.equal(processor([image])["pixel_values"], processor([image.convert("RGB")])["pixel_values"])


def test_rgba_alpha_is_dropped_not_composited():
    image = Image.new("RGBA", (336, 336), (10, 20, 30, 0))  # fully transparent: white compositing would differ
    pixels, _, _ = image_to_crops(image, 1)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(pixels[1][:, 100, 100], (torch.tensor([10, 20, 30]) / 255 - mean) / std, atol=1e-6)


def real_images() -> dict[str, Image.Image]:
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()),  # 512x512 photo
        "coffee": Image.fromarray(skimage.data.coffee()),  # 600x400 photo
        "page": Image.fromarray(skimage.data.page()),  # 384x191 grayscale scan
        "china": Image.fromarray(china),  # 640x427 photo
        "grace_hopper": Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")),  # 512x600 JPEG
        "flower": Image.fromarray(flower),
    }


def reference_crops(image: Image.Image, num_crops: int) -> torch.Tensor:
    """The spec's section 4 step by step, with PIL and numpy only (none of phi3v's functions): transpose portrait
    images, scale loop, PIL bilinear resize, white padding centred, normalize, row-major tiles, bicubic global view
    of the normalized canvas (torch interpolate, as the spec says), zero crops up to num_crops + 1."""
    image = image.convert("RGB")
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    ratio = image.width / image.height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * 336
    new_h = int(new_w / ratio)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    padded_h = int(np.ceil(new_h / 336) * 336)
    top = (padded_h - new_h) // 2
    canvas = np.full((padded_h, new_w, 3), 255, dtype=np.uint8)
    canvas[top:top + new_h] = resized
    if transposed:
        canvas = canvas.transpose(1, 0, 2)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    normed = ((canvas.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)  # (3, H, W)
    tiles = [normed[:, r:r + 336, c:c + 336] for r in range(0, normed.shape[1], 336)
             for c in range(0, normed.shape[2], 336)]
    glb = torch.nn.functional.interpolate(torch.from_numpy(normed)[None], size=(336, 336), mode="bicubic",
                                          align_corners=False)[0]
    stack = [glb, *map(torch.from_numpy, tiles)] + [torch.zeros(3, 336, 336)] * (num_crops - len(tiles))
    return torch.stack(stack)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "page", "china", "grace_hopper", "flower"])
@pytest.mark.parametrize("num_crops", [4, 16])
def test_real_images(name, num_crops):
    image = real_images()[name]
    if name == "astronaut":  # a portrait crop too: the transposed path
        image = image.crop((0, 0, 300, 512))
    out = Phi3VImageProcessor(num_crops=num_crops)([image])
    height, width = out["image_sizes"][0].tolist()
    assert out["num_img_tokens"][0] == num_image_tokens(*image.size, num_crops)
    assert (height, width) == hd_sizes(*image.size, num_crops)[1][::-1]
    assert torch.allclose(out["pixel_values"][0], reference_crops(image, num_crops), atol=1e-5)


def test_processor_config_round_trip(tmp_path):
    processor = Phi3VImageProcessor(num_crops=16)
    processor.save_pretrained(tmp_path)
    loaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=4).num_crops == 4


def test_extreme_aspect_ratio_keeps_one_pixel_row():
    # official: int(336 / 337) = 0 rows -> a resize error; we keep one row of pixels and pad the rest with white
    assert hd_sizes(337, 1, 1) == ((336, 1), (336, 336))
    out = Phi3VImageProcessor(num_crops=1)([Image.new("RGB", (1, 337))])
    assert out["image_sizes"].tolist() == [[336, 336]] and out["num_img_tokens"] == [num_image_tokens(1, 337, 1)]


@pytest.mark.parametrize("bad", [(0, 10, 4), (10, 10, 0)])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError, match="must be"):
        hd_sizes(*bad)


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (1, 2), (2, 1), (3, 5), (5, 3), (4, 3), (1, 4), (4, 1), (2, 6),
                                       (5, 2)])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (5, 7, 0, 0), (0, 0, 76, 77), (1, 2, 3, 3), (0, 1, 0, 0),
                                  (160, 161, 0, 0)])
def test_global_view_equals_interpolate(rows, cols, pads):
    """The one-axis passes on the part of the canvas that can see the image (`pads` = padding above, below, left,
    right, one value per channel) against F.interpolate, bit for bit; on x86 (AVX2, AVX-512 and plain kernels) they
    are what runs, not the fallback."""
    height, width = rows * CROP, cols * CROP
    top, below, left, right = (min(pad, size // 3) for pad, size in zip(pads, (height, height, width, width)))
    generator = torch.Generator().manual_seed(rows * 10 + cols)
    canvas = torch.randn(3, height, width, generator=generator)
    box = (top, height - below, left, width - right)
    image = canvas[:, box[0]:box[1], box[2]:box[3]].clone()
    canvas[:] = torch.randn(3, 1, 1, generator=generator)  # a random padding value: white's can hide rounding
    canvas[:, box[0]:box[1], box[2]:box[3]] = image
    expected = torch.nn.functional.interpolate(canvas[None], size=(CROP, CROP), mode="bicubic", align_corners=False)
    assert torch.equal(global_view(canvas, box), expected[0])
    if platform.machine() in ("x86_64", "AMD64"):
        assert _separable_is_exact(rows, cols)


def test_global_view_falls_back_where_the_passes_differ(monkeypatch):
    """Where the one-axis passes would not give F.interpolate's bits, it calls F.interpolate."""
    import phi3v.models.phi3_v.image_processing as image_processing

    monkeypatch.setattr(image_processing, "_separable_is_exact", lambda rows, cols: False)
    monkeypatch.setattr(image_processing, "downscale_axis", None)  # must not be called
    canvas = torch.randn(3, 2 * CROP, 2 * CROP, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(canvas[None], size=(CROP, CROP), mode="bicubic", align_corners=False)
    assert torch.equal(image_processing.global_view(canvas), expected[0])
