"""The processor's output is bit-identical to what it was before it was made faster (commit f1c84a7).

Golden sha256 prefixes, computed with that commit's code on the seven real images (scikit-image's page, text,
astronaut and coffee, scikit-learn's china and flower, matplotlib's grace_hopper JPEG) at num_crops 4 and 16:
one over input_ids, image_sizes and the crops (pixel_values[:, 1:], zero padding crops included), one over the
global view (pixel_values[:, 0]). The crops are elementwise IEEE float32 arithmetic, the same on every CPU. The
global view is PyTorch's bicubic kernel, whose last bits differ between its builds for CPU capabilities (the AVX2
and AVX-512 ones agree; the plain one differs), so it has one golden value per capability; elsewhere it is
checked against the bicubic resize of the canvas that the (exactly checked) crops form.

Regenerate only if the expected output changes on purpose (it must stay equal to the official processor's):
run the test's `digests` with the old and the new code under ATEN_CPU_CAPABILITY=default and =avx2.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from phi3v.models.phi3_v import image_processing
from phi3v.models.phi3_v.image_processing import CROP
from tests.test_image_processing import real_images

PROMPT = "<|user|><|image_1|><|end|><|assistant|>"  # special tokens only: ids independent of the BPE vocabulary

# name, num_crops, sha256[:16] of (input_ids, image_sizes, crops), global view on AVX2/AVX-512, global view plain
GOLDEN = [
    ("page", 4, "649240213b5ac0f1", "96df10b0c7400cf5", "c4195a921610eb59"),
    ("text", 4, "702520d63876fc84", "7b81c0f8d47d80bd", "03c6cefde4111295"),
    ("astronaut", 4, "f50c2f478ef45fbb", "c9dccfd1084da54c", "26a5cb2a48dd1783"),
    ("coffee", 4, "55eeeae5ebda3674", "258983c5a89d512c", "20670f170e90381b"),
    ("china", 4, "576957947f8f2939", "0cb9e29da98a52b1", "15b920c49417386c"),
    ("flower", 4, "128ded59ae2a1542", "9bc78efc2fac6d8b", "2d451044e77d2d25"),
    ("grace_hopper", 4, "ac958a2f35377463", "6ca149a8483e72d4", "1d1ca507ae96e1fb"),
    ("page", 16, "3e691feeb2aa0469", "b9ae05db03aa7a91", "b9ae05db03aa7a91"),
    ("text", 16, "1f2a36419db2ae3a", "fdb50cf4e9cd9bf8", "2316a88abc8f37c7"),
    ("astronaut", 16, "bb414ca821035ef2", "7e16f78221cfc535", "233072ae5d26ad86"),
    ("coffee", 16, "7c21fae04811e85e", "33fa71fdff8546d4", "2386452b03d041bf"),
    ("china", 16, "7c25616d0f03bc42", "2b9342d1a2111a69", "8cd22c7aeb4cdd17"),
    ("flower", 16, "133eab7934df813b", "774906349f40c5bc", "a05a6380e4966d63"),
    ("grace_hopper", 16, "3b041853f2e6bed4", "0790577662c620a3", "094079602251102f"),
]


def digests(processor, image, num_crops: int) -> tuple[str, str, dict]:
    processor.image_processor.num_crops = num_crops
    out = processor(PROMPT, [image])
    main = hashlib.sha256()
    for tensor in (out["input_ids"], out["image_sizes"], out["pixel_values"][:, 1:]):
        main.update(tensor.contiguous().numpy().tobytes())
    glb = hashlib.sha256(out["pixel_values"][:, 0].contiguous().numpy().tobytes())
    return main.hexdigest()[:16], glb.hexdigest()[:16], out


@pytest.fixture(scope="module")
def images():
    images = real_images()
    import skimage.data
    from PIL import Image

    images["text"] = Image.fromarray(skimage.data.text())  # 448x172 grayscale
    return images


@pytest.mark.parametrize("global_path", ["auto", "interpolate"])
@pytest.mark.parametrize("name,num_crops,crops_digest,global_digest_avx,global_digest_plain", GOLDEN,
                         ids=[f"{row[0]}-{row[1]}" for row in GOLDEN])
def test_processor_output_is_unchanged(processor, images, name, num_crops, crops_digest, global_digest_avx,
                                       global_digest_plain, global_path, monkeypatch):
    """global_path "interpolate" forces the global view's fallback (F.interpolate), taken wherever its self-check
    fails."""
    if global_path == "interpolate":
        monkeypatch.setattr(image_processing, "_separable_is_exact", lambda rows, cols: False)
    saved = processor.image_processor.num_crops
    try:
        main, glb, out = digests(processor, images[name], num_crops)
    finally:
        processor.image_processor.num_crops = saved
    assert main == crops_digest
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        assert glb == global_digest_avx
    elif capability == "DEFAULT":
        assert glb == global_digest_plain
    else:  # another CPU family: the global view must be the bicubic resize of the canvas the crops form
        height, width = out["image_sizes"][0].tolist()
        rows, cols = height // CROP, width // CROP
        crops = out["pixel_values"][0, 1:1 + rows * cols].view(rows, cols, 3, CROP, CROP)
        canvas = crops.permute(2, 0, 3, 1, 4).reshape(1, 3, height, width)
        expected = torch.nn.functional.interpolate(canvas, size=(CROP, CROP), mode="bicubic", align_corners=False)
        assert torch.equal(out["pixel_values"][0, 0], expected[0])


@pytest.mark.parametrize("seed", range(12))
def test_random_sizes_equal_the_previous_implementation(seed):
    """Random sizes and num_crops (portrait and landscape, odd paddings, slivers) against the implementation the
    package had before it was made faster, kept in the benchmark as its baseline: bit for bit."""
    import numpy as np
    from PIL import Image

    from bench.processor_throughput import reference_image_processor
    from phi3v.models.phi3_v.image_processing import Phi3VImageProcessor

    rng = np.random.default_rng(seed)
    width, height = (int(size) for size in rng.integers(1, 1600, 2))
    if seed % 4 == 0:
        width = int(rng.integers(1, 40))  # a sliver: a tall grid of crops
    num_crops = int(rng.choice([1, 2, 4, 9, 16]))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = Phi3VImageProcessor(num_crops=num_crops)([image])
    expected = reference_image_processor([image], num_crops)
    assert torch.equal(out["image_sizes"], expected["image_sizes"]), (width, height, num_crops)
    assert torch.equal(out["pixel_values"], expected["pixel_values"]), (width, height, num_crops)
