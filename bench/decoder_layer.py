"""One full-size Phi-3 decoder layer, SDPA vs eager attention: forward+backward time and peak memory.

    python bench/decoder_layer.py [--tokens 2443] [--repeats 2] [--json bench/results/decoder_layer.json]

What: transformers' own `Phi3DecoderLayer` built from `Phi3VConfig.official()` (hidden 3072, 32 heads, MLP 8192,
LongRoPE), batch 1 at the DocVQA mean of 2,443 tokens, fp32, weights trainable (full fine-tuning). The same layer
(same weights) runs with `config._attn_implementation` = "sdpa" and "eager", each with what `Phi3Model.forward`
would give it: the rotary (cos, sin) of `Phi3RotaryEmbedding`, and the mask of transformers' own mask function
(None for SDPA, which then runs `is_causal=True`; an additive (1, 1, L, L) causal mask for eager). The official
model code has only the eager path (or flash-attn), which materializes the (heads, L, L) attention matrix.

How: the first call of each variant is the warm-up and the check that both compute the same causal attention
(output, input gradient and qkv weight gradient allclose at fp32 noise). Then `--repeats` alternating timed rounds,
median. Peak memory: one step per variant in a fresh process (see bench/common.py), which includes the 453 MB of
weight gradients the layer produces in either variant.

Takes about 4-5 minutes on 2 CPU cores at 2,443 tokens (each step is ~1.9 TFLOP, ~30 s); `--tokens 512` for a
quick look (the eager overhead grows with the square of the length).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/decoder_layer.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RotaryEmbedding

from bench.common import (
    add_json_argument,
    default_device,
    markdown_table,
    median,
    mib,
    peak_memory,
    ratio,
    time_alternating,
    write_json,
)
from phi3v.models.phi3_v.configuration import Phi3VConfig

IMPLEMENTATIONS = ("sdpa", "eager")


def build(tokens: int, dtype: str = "float32", device: str = "cpu", seed: int = 0, **config_overrides):
    """(layer, config, hidden (1, L, H) requiring grad, position_ids, (cos, sin), output gradient)."""
    config = Phi3VConfig.official(**config_overrides)
    torch.manual_seed(seed)
    layer = Phi3DecoderLayer(config, layer_idx=0).to(device, getattr(torch, dtype)).train()
    hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=getattr(torch, dtype))
    hidden.requires_grad_(True)
    position_ids = torch.arange(tokens, device=device)[None]
    position_embeddings = Phi3RotaryEmbedding(config).to(device)(hidden, position_ids)
    grad_output = torch.randn_like(hidden)  # fixed: both variants backpropagate the same gradient
    return layer, config, hidden, position_ids, position_embeddings, grad_output


def causal_mask(config, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The mask `Phi3Model.forward` builds for `config._attn_implementation` (no padding, no cache)."""
    mask_function = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
    return mask_function(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                         position_ids=position_ids)


def make_steps(tokens: int, implementations=IMPLEMENTATIONS, **kwargs) -> dict:
    """{implementation: step} sharing one layer and input. A step is forward+backward with gradients reset to
    None first; it returns (output, input gradient, qkv weight gradient)."""
    layer, config, hidden, position_ids, position_embeddings, grad_output = build(tokens, **kwargs)
    masks = {}
    for implementation in implementations:
        config._attn_implementation = implementation
        masks[implementation] = causal_mask(config, hidden, position_ids)

    def step_for(implementation):
        def step():
            config._attn_implementation = implementation  # read by the attention at every call
            hidden.grad = None
            layer.zero_grad(set_to_none=True)
            output = layer(hidden, attention_mask=masks[implementation], position_ids=position_ids,
                           position_embeddings=position_embeddings)
            output.backward(grad_output)
            return output.detach(), hidden.grad, layer.self_attn.qkv_proj.weight.grad

        return step

    return {implementation: step_for(implementation) for implementation in implementations}


def make_step(implementation: str, tokens: int, **kwargs):
    """One implementation's step, on its own (the setup `peak_memory` runs in a fresh process)."""
    return make_steps(tokens, implementations=(implementation,), **kwargs)[implementation]


def check_same(results: dict, dtype: str = "float32") -> dict:
    """Raise unless both implementations gave the same output and gradients; returns the largest differences."""
    (out_a, grad_a, weight_a), (out_b, grad_b, weight_b) = results.values()
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_a, out_b, **tolerance)
    torch.testing.assert_close(grad_a, grad_b, **tolerance)
    torch.testing.assert_close(weight_a, weight_b, **tolerance)
    return {"max_abs_diff_output": float((out_a - out_b).abs().max()),
            "max_abs_diff_input_grad": float((grad_a - grad_b).abs().max()),
            "max_abs_diff_qkv_grad": float((weight_a - weight_b).abs().max())}


def run(tokens: int, repeats: int, dtype: str = "float32", device: str = "cpu", measure_memory: bool = True,
        **config_overrides) -> dict:
    steps = make_steps(tokens, dtype=dtype, device=device, **config_overrides)
    # The first call of each variant is the warm-up and gives the outputs to compare.
    check = check_same({name: step() for name, step in steps.items()}, dtype)
    seconds = time_alternating(steps, repeats=repeats, warmup=0, device=device)
    del steps
    memory = {name: peak_memory("bench.decoder_layer:make_step",
                                {"implementation": name, "tokens": tokens, "dtype": dtype, "device": device,
                                 **config_overrides}, device) if measure_memory else None
              for name in IMPLEMENTATIONS}
    return {"tokens": tokens, "dtype": dtype, "device": device, "check": check, "seconds": seconds,
            "median_seconds": {name: median(s) for name, s in seconds.items()}, "peak_bytes": memory}


def report(result: dict) -> str:
    times, memory = result["median_seconds"], result["peak_bytes"]
    rows = [[name, f"{times[name]:,.2f} s", mib(memory[name]) if memory[name] is not None else "-"]
            for name in IMPLEMENTATIONS]
    rows.append(["eager / sdpa", ratio(times["eager"], times["sdpa"]),
                 ratio(memory["eager"], memory["sdpa"]) if memory["sdpa"] else "-"])
    check = result["check"]
    return "\n\n".join([
        f"**One Phi-3 decoder layer (official size), batch 1 x {result['tokens']:,} tokens, {result['dtype']} on "
        f"{result['device']}, forward+backward with weight gradients; median of {len(result['seconds']['sdpa'])} "
        "alternating rounds; peak = memory growth of one step**",
        markdown_table(["attention", "time", "peak memory"], rows),
        f"Same causal attention: max |diff| output {check['max_abs_diff_output']:.1e}, input gradient "
        f"{check['max_abs_diff_input_grad']:.1e}, qkv weight gradient {check['max_abs_diff_qkv_grad']:.1e}.",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2443, help="sequence length (DocVQA mean: 2,443)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per variant (after the warm-up)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    add_json_argument(parser)
    args = parser.parse_args(argv)

    result = run(args.tokens, args.repeats, args.dtype, args.device, measure_memory=not args.no_memory)
    markdown = report(result)
    print(markdown)
    write_json(args.json, "decoder_layer", result, markdown)
    return result


if __name__ == "__main__":
    main()
