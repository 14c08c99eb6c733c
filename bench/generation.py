"""Greedy generation at the DocVQA shape: the package's `generate` against the previous one, tokens/s by batch size.

    python bench/generation.py [--batch_sizes 1 4 16] [--new_tokens 32] [--repeats 3] [--json FILE]

What: a DocVQA-shaped prompt per row (`bench.gpu_train.make_batch`: a 1200x2040 page at num_crops 16 = 2,377 image
tokens in 2,443 tokens, 16 real crops), `--new_tokens` greedy tokens (min = max, so every variant runs the same
number of steps), batch 1, 4 and 16, one torch thread per process. Two variants on the same model, alternating:

- previous: transformers' `GenerationMixin.generate` with a dynamic KV cache and the pixels handed to the model,
  which is what `Phi3VForCausalLM.generate` was before it got its own (CLIP in the prefill forward, again at a
  LongRoPE re-feed; keys and values concatenated onto the cache at every step);
- package: `Phi3VForCausalLM.generate`: image features computed once per prompt, a KV cache that appends in place
  (`phi3v.kv_cache`).

Both must give the same tokens (asserted). Within each call, a forward hook stamps the end of the prefill (the
first forward), so that the decode rate can be told apart: decode ms/token = (end - prefill end) / (tokens - 1).

Model: a reduced-size Phi-3.5-vision with random weights, because the full 4.1 B-parameter model in fp32 (16 GB) does
not fit next to other jobs on the 2-core machine this was written on, and one full-size prefill at 2,443 tokens takes
minutes there. The reduced model keeps the official vocabulary (32,064), head size (96), LongRoPE factors, sequence
length and image geometry, with hidden 768, 8 heads, MLP 2048, 2 layers and a 2-layer CLIP of width 256. What the
package changes (the per-step cache copy, CLIP runs) does not depend on the width, but its share of a step does:
`--full_size` runs the official dimensions where there is the memory and time (a GPU: `--device cuda`).

Takes about 5-10 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/generation.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import GenerationMixin

from bench.common import add_json_argument, default_device, markdown_table, median, synchronize, write_json

PAGE = (1200, 2040)  # width, height: 3 x 5 crops at num_crops 16
SEQ_LEN = 2443  # the DocVQA mean at num_crops 16
REDUCED = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=8,
               vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                  projection_dim=256))


def build_model(full_size: bool, device: str, dtype: torch.dtype = torch.float32):
    from phi3v import Phi3VForCausalLM
    from phi3v.models.phi3_v.configuration import Phi3VConfig

    official = Phi3VConfig.official()
    overrides = {} if full_size else {**REDUCED, "img_processor": {**official.img_processor, "image_dim_out": 256}}
    config = Phi3VConfig.official(**overrides, dtype="float32")
    torch.manual_seed(0)
    model = Phi3VForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def prompts(model, batch_size: int, device: str) -> dict:
    from bench.gpu_train import make_batch

    batch = make_batch(model.config, batch_size, PAGE, SEQ_LEN, 1, 16, device)
    batch.pop("labels")
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


def variants(model, batch: dict, new_tokens: int) -> dict:
    """name -> zero-argument step returning the generated ids."""
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def previous():
        return GenerationMixin.generate(model, **batch, **common, cache_implementation="dynamic")

    def package():
        return model.generate(**batch, **common)

    return {"previous": previous, "package": package}


def timed(model, step, device: str) -> tuple[float, float, torch.Tensor]:
    """(seconds for the whole call, seconds to the end of the first forward = the prefill, generated ids)."""
    stamps = []

    def stamp(*args):
        synchronize(device)
        stamps.append(time.perf_counter())

    hook = model.register_forward_hook(stamp)
    try:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = step()
        synchronize(device)
        end = time.perf_counter()
    finally:
        hook.remove()
    return end - start, stamps[0] - start, out


def measure(model, batch_size: int, new_tokens: int, repeats: int, device: str) -> dict:
    """Median seconds per `generate` call of each variant, alternating (A B, B A, ...); tokens asserted equal."""
    batch = prompts(model, batch_size, device)
    steps = variants(model, batch, new_tokens)
    outputs = {name: step() for name, step in steps.items()}  # warm-up
    assert torch.equal(outputs["previous"], outputs["package"]), f"batch {batch_size}: different tokens"
    seconds = {name: {"all": [], "prefill": []} for name in steps}
    for round_ in range(repeats):
        for name in steps if round_ % 2 == 0 else reversed(steps):
            total, prefill, out = timed(model, steps[name], device)
            assert torch.equal(out, outputs["previous"]), f"batch {batch_size}: different tokens"
            seconds[name]["all"].append(total)
            seconds[name]["prefill"].append(prefill)
    row = {"batch_size": batch_size, "new_tokens": new_tokens}
    for name in steps:
        total, first = median(seconds[name]["all"]), median(seconds[name]["prefill"])
        decode = median([(a - p) / (new_tokens - 1) for a, p in zip(seconds[name]["all"], seconds[name]["prefill"])])
        row[name] = {"seconds": total, "tokens_per_s": batch_size * new_tokens / total, "prefill_s": first,
                     "decode_ms_per_token": decode * 1e3}
    row["decode_speedup"] = row["previous"]["decode_ms_per_token"] / row["package"]["decode_ms_per_token"]
    row["speedup"] = row["package"]["tokens_per_s"] / row["previous"]["tokens_per_s"]
    return row


def run(batch_sizes, new_tokens: int, repeats: int, device: str, full_size: bool) -> dict:
    if device == "cpu":
        torch.set_num_threads(1)
    model = build_model(full_size, device, torch.bfloat16 if device != "cpu" else torch.float32)
    rows = []
    for batch_size in batch_sizes:
        rows.append(measure(model, batch_size, new_tokens, repeats, device))
        print(f"batch {batch_size}: {rows[-1]}", flush=True)  # progress: the larger batches take minutes
    return {"rows": rows, "full_size": full_size, "device": device, "repeats": repeats}


def report(result: dict) -> str:
    rows = []
    for row in result["rows"]:
        prev, ours = row["previous"], row["package"]
        rows.append([row["batch_size"], f"{prev['tokens_per_s']:.2f}", f"{ours['tokens_per_s']:.2f}",
                     f"{row['speedup']:.2f}x", f"{prev['prefill_s']:.2f} / {ours['prefill_s']:.2f} s",
                     f"{prev['decode_ms_per_token']:.0f} / {ours['decode_ms_per_token']:.0f} ms",
                     f"{row['decode_speedup']:.2f}x"])
    size = "full-size" if result["full_size"] else "reduced-size (hidden 768, 2 layers, vocab 32,064)"
    return "\n\n".join([
        f"**Greedy generation, {result['rows'][0]['new_tokens']} new tokens after a DocVQA-shaped prompt (2,443 "
        f"tokens, one page at num_crops 16), {size} model, {result['device']}; median of {result['repeats']} "
        "alternating calls; same tokens (asserted)**",
        markdown_table(["batch", "previous tokens/s", "package tokens/s", "speed-up", "prefill (previous / package)",
                        "decode per token", "decode speed-up"], rows),
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant and batch size")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--full_size", action="store_true", help="the official dimensions (needs ~17 GB, or a GPU)")
    add_json_argument(parser)
    args = parser.parse_args(argv)

    result = run(args.batch_sizes, args.new_tokens, args.repeats, args.device, args.full_size)
    markdown = report(result)
    print(markdown)
    write_json(args.json, "generation", result, markdown)
    return result


if __name__ == "__main__":
    main()
