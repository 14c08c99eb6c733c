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
    from phi3v.models.phi3_v.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-phi3v"), seed=0)


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from phi3v import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def real_vocab_dir(tmp_path_factory):
    """`python -m phi3v.tiny DIR --real_vocab`: the tiny checkpoint with the real Phi-3 vocabulary, laid out as the
    official repo (config.json, "LlamaTokenizer"); read-only for the tests."""
    from phi3v.tiny import main

    directory = tmp_path_factory.mktemp("tiny-real-vocab")
    main([str(directory), "--real_vocab"])
    return directory


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from phi3v import Phi3VForCausalLM

    return Phi3VForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def phi4_dir(tmp_path_factory):
    """`python -m phi3v.tiny DIR --like phi-4-multimodal-instruct`: tiny Phi-4-multimodal in the native layout, with
    a built-in vision-lora/ folder; read-only for the tests."""
    from phi3v.models.phi4_mm.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-phi4mm"), seed=0)


@pytest.fixture(scope="session")
def phi4_processor(phi4_dir):
    from phi3v.models.phi4_mm.processing import Phi4MMProcessor

    return Phi4MMProcessor.from_pretrained(phi4_dir)


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random-noise image of the given size and mode."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def greedy_by_full_forwards(model, inputs, steps: int, banned) -> torch.Tensor:
    """Greedy decoding by definition: a full forward (no cache, CLIP every step) per new token, `banned` ids
    (the stop tokens, so every run has `steps` tokens) never chosen: the reference generate() must equal."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                           image_sizes=inputs["image_sizes"]).logits[:, -1]
            logits[:, banned] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.fixture
def rng_image():
    return make_image


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ucf_data(tmp_path_factory):
    """A small converted video dataset: 3 classes, 4/1/1 videos per class, 2 frames each (convert_ucf101 output)."""
    import convert_ucf101
    from phi3v.data.synthetic import UCF101_SUBSET_CLASSES, make_video_dataset

    root = tmp_path_factory.mktemp("ucf")
    make_video_dataset(root / "videos", classes=UCF101_SUBSET_CLASSES[:3],
                       videos_per_split={"train": 4, "val": 1, "test": 1}, num_frames=8, size=(64, 48))
    convert_ucf101.main(["--src", str(root / "videos"), "--out_dir", str(root / "data"), "--num_frames", "2",
                         "--num_workers", "2", "--no-tqdm"])
    return root / "data"


def ucf_args(tiny_dir, data_dir, output_dir, *extra: str) -> list[str]:
    """Fast CPU settings for finetune_hf_trainer_ucf101.main in tests."""
    return ["--model_name_or_path", str(tiny_dir), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
            "--num_crops", "1", "--batch_size", "4", "--batch_size_per_gpu", "2", "--dataloader_num_workers", "0",
            "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--no-tqdm",
            "--report_to", "none", "--max_new_tokens", "8", *extra]
