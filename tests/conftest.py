"""Shared fixtures: one tiny random checkpoint per session (official layout), its processor and model, images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; code paths must say so clearly
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from phi3v.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-phi3v"), seed=0)


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from phi3v import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from phi3v import Phi3VForCausalLM

    return Phi3VForCausalLM.from_pretrained(tiny_dir).eval()


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random-noise image of the given size and mode."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


@pytest.fixture
def rng_image():
    return make_image


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
