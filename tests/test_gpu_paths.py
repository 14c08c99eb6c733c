"""Fixes for the CUDA paths that can be reached on CPU: per-row LongRoPE, evaluation precision and batch size,
fp32 master weights, distributed evaluation settings (issue 10). bench/gpu_check.py covers what needs a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from phi3v import Phi3VForCausalLM
from phi3v.tiny import tiny_config

SWITCH = 48  # original_max_position_embeddings of the small-switch model: prompts of a few dozen tokens cross it


@pytest.fixture(scope="module")
def switch_model():
    torch.manual_seed(0)
    # weights 10x the usual init: attention sharp enough that the RoPE factors visibly move the logits
    config = tiny_config(original_max_position_embeddings=SWITCH, max_position_embeddings=SWITCH * 32,
                         initializer_range=0.2)
    return Phi3VForCausalLM(config).eval()


def test_rotary_factors_are_chosen_per_row(switch_model):
    """cos/sin of each row follow the spec's LongRoPE formula (6.2) with the factors of that row's own length."""
    rotary = switch_model.model.rotary_emb
    rope = switch_model.config.to_dict()["rope_scaling"]
    head_dim = switch_model.config.hidden_size // switch_model.config.num_attention_heads
    scale = math.sqrt(1 + math.log(32) / math.log(SWITCH))
    short_row = torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(40)])  # left padding, 40 tokens
    long_row = torch.arange(60)  # 60 tokens > 48
    positions = torch.stack([short_row, long_row])
    cos, sin = rotary(torch.zeros(2, 60, head_dim), positions)
    for row, factors in ((0, rope["short_factor"]), (1, rope["long_factor"])):
        inv = 1.0 / (np.array(factors) * 10000.0 ** (np.arange(0, head_dim, 2) / head_dim))
        angles = positions[row].numpy()[:, None] * inv[None]
        expected = np.concatenate([angles, angles], -1)
        np.testing.assert_allclose(cos[row].numpy(), np.cos(expected) * scale, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sin[row].numpy(), np.sin(expected) * scale, rtol=1e-5, atol=1e-5)


def greedy(model, rows: list[list[int]], steps: int, use_cache: bool = True):
    """Left-padded greedy generation of `steps` tokens: (tokens, first-to-last step scores) per row."""
    width = max(map(len, rows))
    ids = torch.tensor([[32000] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=32000,
                             use_cache=use_cache)
    scores = torch.stack(out.scores, 1)  # (B, steps, vocab)
    return out.sequences[:, width:], scores


def test_a_sample_does_not_depend_on_its_batch_mates_across_the_rope_switch(switch_model):
    """A batch straddling the switch: one row crosses it while generating, one starts past it, one never reaches
    it. Each row's scores equal those of the row generated alone, and those equal generation without a cache, where
    every step recomputes all keys with the factors of the current length (what the official cache reset is for)."""
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 900, (n,), generator=generator).tolist() for n in (40, 56, 20)]
    steps = 12  # row 0 passes 48 tokens at its 9th new token
    tokens, scores = greedy(switch_model, rows, steps)
    for i, row in enumerate(rows):
        alone_tokens, alone_scores = greedy(switch_model, [row], steps)
        assert torch.equal(tokens[i], alone_tokens[0]), i
        torch.testing.assert_close(scores[i], alone_scores[0], atol=2e-4, rtol=1e-4)
        no_cache_tokens, no_cache_scores = greedy(switch_model, [row], steps, use_cache=False)
        assert torch.equal(alone_tokens, no_cache_tokens), i
        torch.testing.assert_close(alone_scores, no_cache_scores, atol=2e-4, rtol=1e-4)


def test_a_training_row_does_not_depend_on_its_batch_mates_across_the_rope_switch(switch_model):
    """Right-padded training batch with a 40-token row and a 60-token row: the short row's loss is its loss alone."""
    generator = torch.Generator().manual_seed(2)
    short, long = (torch.randint(3, 900, (n,), generator=generator) for n in (40, 60))
    ids = torch.stack([torch.cat([short, torch.full((20,), 32000)]), long])
    mask = torch.stack([torch.cat([torch.ones(40), torch.zeros(20)]), torch.ones(60)]).long()
    labels = ids.clone()
    labels[0, 40:] = -100
    labels[1] = -100  # only the short row counts
    with torch.no_grad():
        batched = switch_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        alone = switch_model(input_ids=short[None], attention_mask=torch.ones(1, 40).long(), labels=short[None]).loss
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
