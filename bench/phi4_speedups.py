"""Phi-4-multimodal: each speed-up of phi3v.models.phi4_mm against the plain native forward, in one run.

    python bench/phi4_speedups.py [--tokens 1536] [--repeats 3] [--json bench/results/phi4_speedups.json]
    python bench/phi4_speedups.py --quick     # small shapes, one round, no memory: the code path (~45 s)

The model is the tiny random Phi-4-multimodal (phi3v.models.phi4_mm.tiny: the official config, text hidden 64 x 2
layers, SigLIP hidden 32 x 2 layers at the real 448/14 geometry) with the REAL vocabulary of 200,064 tokens, fp32 on
CPU. Every ratio comes from one run with the variants alternating (bench/common.time_alternating, median); every
part asserts that both variants give the same loss and gradients before it times them.

a. LM head only on supervised tokens: our forward with labels (`supervised_lm_loss`) vs transformers' own
   `Phi4MultimodalForCausalLM.forward` with labels (logits at every position over the vocabulary, then its
   `ForCausalLMLoss`), on the same weights: one text sequence of `--tokens` tokens with an 8-token answer,
   forward + backward of the whole model (every parameter trains). Peak memory: resident-set growth of one step in
   a fresh process per variant (bench/common.peak_memory); the full logits tensor's size is also given
   analytically (tokens x vocab x 4 bytes, and the loss keeps ~3 such tensors alive in the backward).
b. SigLIP only on real crops: a batch of a 448x448 image (global view + 1 tile) and a 1000x1000 one (global + 9
   tiles) pads the small image to 10 crops; transformers' Phi4MultimodalImageEmbedding encodes all 20, our
   RealCropImageEmbedding the 12 real ones. Same model, only the image embedding's class differs; image
   features (max |diff|), loss and gradients asserted equal. Timed: the image embedding alone (forward + backward,
   where the skip acts: its ratio carries over to the full-size model, where SigLIP is ~400M parameters per
   crop of 1,024 patches) and the whole model's step (at this tiny decoder, mostly SigLIP too).
c. Length-grouped batches: padded share of batch tokens with `phi3v.train.sampler.LengthGroupedSampler` vs random
   batches (per-GPU batch 8) on mixed-length samples (image token counts of mixed photo/document/screenshot sizes
   from `phi4_mm.processing.num_image_tokens` at num_crops 16, the recipes' largest, plus question and answer),
   over 4,000 samples;
   and the time of one epoch of model steps over a subset (text tokens of those lengths, no pixels: the decoder's
   share of the work, which padding multiplies), random vs grouped order, same summed loss asserted (the same
   samples; padding adds no loss).

Takes ~2-4 minutes on 2 shared CPU cores (memory: ~4 GB for the full-logits step at 1,536 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/phi4_speedups.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from transformers import Phi4MultimodalForCausalLM as NativeForCausalLM
from transformers import Phi4MultimodalImageProcessor
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

from bench.common import (
    add_json_argument,
    markdown_table,
    median,
    mib,
    peak_memory,
    ratio,
    time_alternating,
    write_json,
)
from bench.padding import padded_share
from phi3v.models.family import IGNORE_INDEX
from phi3v.models.phi4_mm.modeling import Phi4MultimodalForCausalLM, RealCropImageEmbedding, real_crops
from phi3v.models.phi4_mm.processing import Phi4MMCollator, num_image_tokens
from phi3v.models.phi4_mm.tiny import tiny_config
from phi3v.train.sampler import LengthGroupedSampler

PAD, IMAGE_TOKEN, VOCAB = 199999, 200010, 200064
ANSWER = 8  # supervised tokens per sample (a short answer + <|end|>)
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def build_model(seed: int = 0) -> Phi4MultimodalForCausalLM:
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(tiny_config())
    assert model.config.vocab_size == VOCAB
    return model.train()


def text_sample(length: int, generator: torch.Generator) -> dict:
    """Random text ids (below the special tokens) with the last ANSWER tokens supervised."""
    ids = torch.randint(0, PAD, (length,), generator=generator)
    labels = torch.full((length,), IGNORE_INDEX)
    labels[-ANSWER:] = ids[-ANSWER:]
    return {"input_ids": ids, "labels": labels, "sample_id": "s"}


def grads(model: torch.nn.Module, names: tuple[str, ...]) -> dict:
    parameters = dict(model.named_parameters())
    return {name: parameters[name].grad.detach().clone() for name in names}


def check_same(results: dict) -> dict:
    """Raise unless both variants gave the same loss and gradients; returns the largest differences."""
    (loss_a, grads_a), (loss_b, grads_b) = results.values()
    torch.testing.assert_close(loss_a, loss_b, **TOLERANCE)
    diffs = {"loss": float(loss_a), "max_abs_diff_loss": float((loss_a - loss_b).abs())}
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **TOLERANCE)
        diffs[f"max_abs_diff_grad {name}"] = float((grads_a[name] - grads_b[name]).abs().max())
    return diffs


# ------------------------------------------------------------------------------------------------- a. LM head

LM_GRADS = ("model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight", "model.norm.weight")


def lm_head_steps(tokens: int, variants=("ours", "native"), seed: int = 0) -> dict:
    """{variant: step}: forward + backward of the model with labels, ours vs transformers' own forward."""
    model = build_model(seed)
    batch = Phi4MMCollator(PAD)([text_sample(tokens, torch.Generator().manual_seed(seed))])
    batch.pop("sample_ids")
    forwards = {"ours": model.forward, "native": lambda **kw: NativeForCausalLM.forward(model, **kw)}

    def step_for(forward):
        def step():
            model.zero_grad(set_to_none=True)
            loss = forward(**batch).loss
            loss.backward()
            return loss.detach(), grads(model, LM_GRADS)

        return step

    return {name: step_for(forwards[name]) for name in variants}


def lm_head_step(variant: str, tokens: int) -> callable:
    """One variant's step on its own (what peak_memory runs in a fresh process)."""
    return lm_head_steps(tokens, (variant,))[variant]


def part_a(tokens: int, repeats: int, memory: bool) -> dict:
    steps = lm_head_steps(tokens)
    check = check_same({name: step() for name, step in steps.items()})  # also the warm-up
    seconds = time_alternating(steps, repeats, warmup=0)
    del steps
    peaks = {name: peak_memory("bench.phi4_speedups:lm_head_step", {"variant": name, "tokens": tokens})
             if memory else None for name in ("ours", "native")}
    return {"tokens": tokens, "check": check, "seconds": seconds, "peak_bytes": peaks,
            "logits_bytes": tokens * VOCAB * 4}


# ------------------------------------------------------------------------------------------------- b. real crops

SIGLIP = "model.embed_tokens_extend.image_embed"
VISION_GRADS = (f"{SIGLIP}.img_processor.embeddings.patch_embedding.weight", f"{SIGLIP}.img_projection_up.weight",
                "model.layers.0.self_attn.qkv_proj.weight")
IMAGES = ((448, 448), (1000, 1000))  # 2 and 10 crops (global view included)
QUICK_IMAGES = ((448, 448), (896, 448))  # 2 and 3


def image_batch(sizes=IMAGES, seed: int = 0) -> dict:
    """One sample per image: 20 text tokens, the image's run of image tokens, 12 question tokens, the answer;
    collated as the recipes collate (crops padded to the largest image's count with pixels 0 / mask 1)."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    processor = Phi4MultimodalImageProcessor(dynamic_hd=36)
    examples = []
    for width, height in sizes:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels = dict(processor([image], return_tensors="pt"))
        count = int(pixels.pop("num_img_tokens")[0])
        assert count == num_image_tokens(width, height, 36)
        text = text_sample(20 + count + 12 + ANSWER, generator)
        text["input_ids"][20:20 + count] = IMAGE_TOKEN
        examples.append({**text, **pixels})
    batch = Phi4MMCollator(PAD)(examples)
    batch.pop("sample_ids")
    return batch


@contextlib.contextmanager
def native_image_embedding(model):
    """transformers' own image embedding (every crop through SigLIP) inside the block."""
    embedding = model.model.embed_tokens_extend.image_embed
    embedding.__class__ = Phi4MultimodalImageEmbedding
    try:
        yield
    finally:
        embedding.__class__ = RealCropImageEmbedding


def real_crop_steps(sizes=IMAGES, seed: int = 0) -> tuple[dict, dict, dict]:
    """({variant: model step}, {variant: image embedding step}, batch). The embeddings are frozen, as in LoRA."""
    model = build_model(seed)
    model.model.embed_tokens.requires_grad_(False)
    batch = image_batch(sizes, seed)
    embedding = model.model.embed_tokens_extend.image_embed
    image_args = {k: batch[k] for k in ("image_pixel_values", "image_sizes", "image_attention_mask")}

    def variant(name):
        return native_image_embedding(model) if name == "native" else contextlib.nullcontext()

    def model_step(name):
        def step():
            with variant(name):
                model.zero_grad(set_to_none=True)
                loss = model(**batch).loss
                loss.backward()
            return loss.detach(), grads(model, VISION_GRADS)

        return step

    def embedding_step(name):
        def step():
            with variant(name):
                model.zero_grad(set_to_none=True)
                inputs_embeds = model.model.embed_tokens(batch["input_ids"])
                features = embedding(batch["input_ids"], inputs_embeds, **image_args)
                features.square().mean().backward()
            return features.detach(), grads(model, VISION_GRADS[:2])

        return step

    names = ("ours", "native")
    return {n: model_step(n) for n in names}, {n: embedding_step(n) for n in names}, batch


def part_b(repeats: int, sizes=IMAGES) -> dict:
    model_steps, embedding_steps, batch = real_crop_steps(sizes)
    features = {name: step() for name, step in embedding_steps.items()}  # warm-up and check
    (ours, ours_grads), (native, native_grads) = features.values()
    torch.testing.assert_close(ours, native, **TOLERANCE)
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], native_grads[name], **TOLERANCE)
    check = check_same({name: step() for name, step in model_steps.items()})
    check["max_abs_diff_features"] = float((ours - native).abs().max())
    embedding_seconds = time_alternating(embedding_steps, repeats, warmup=0)
    model_seconds = time_alternating(model_steps, repeats, warmup=0)
    pixels = batch["image_pixel_values"]
    real = int(real_crops(batch["image_sizes"], pixels.shape[1], 448).sum())
    return {"images": [list(size) for size in sizes], "crops_encoded": {"ours": real, "native": pixels.shape[0] *
            pixels.shape[1]}, "tokens": list(batch["input_ids"].shape), "check": check,
            "embedding_seconds": embedding_seconds, "model_seconds": model_seconds}


# ------------------------------------------------------------------------------------------------- c. grouping

# (share, (width range), (aspect range = height / width)): phone photos, landscape photos, document pages,
# screenshots, small web images
IMAGE_KINDS = [(0.25, (600, 4000), (1.2, 1.4)), (0.25, (600, 4000), (0.55, 0.8)), (0.2, (1000, 2600), (1.25, 1.45)),
               (0.15, (1000, 2600), (0.5, 0.65)), (0.15, (150, 600), (0.6, 1.6))]


def mixed_lengths(count: int, seed: int = 0, max_crops: int = 36) -> list[int]:
    """Token counts of one-image samples of mixed image sizes: image tokens + 12 template tokens + a question
    (log-normal, median 14 tokens) + the answer."""
    rng = np.random.default_rng(seed)
    shares = np.array([kind[0] for kind in IMAGE_KINDS])
    lengths = []
    for kind in rng.choice(len(IMAGE_KINDS), size=count, p=shares / shares.sum()):
        _, widths, aspects = IMAGE_KINDS[kind]
        width = int(rng.uniform(*widths))
        height = max(1, int(width * rng.uniform(*aspects)))
        question = int(np.clip(rng.lognormal(np.log(14), 0.4), 4, 80))
        lengths.append(num_image_tokens(width, height, max_crops) + 12 + question + ANSWER)
    return lengths


def epoch_steps(lengths: list[int], batch_size: int, seed: int = 0) -> tuple[dict, dict]:
    """({order: one epoch of model steps}, {order: sample order}) for random and length-grouped batches. The
    embeddings are frozen (as in LoRA): their dense 200k-row gradient is a fixed cost per step, not per token."""
    model = build_model(seed)
    model.model.embed_tokens.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    samples = [text_sample(length, generator) for length in lengths]
    collate = Phi4MMCollator(PAD)
    orders = {"random": np.random.default_rng(seed).permutation(len(lengths)).tolist(),
              "grouped": list(LengthGroupedSampler(lengths, batch_size, seed))}

    def epoch(order):
        def run():
            total = torch.zeros(())
            model.zero_grad(set_to_none=True)
            for start in range(0, len(order), batch_size):
                batch = collate([samples[i] for i in order[start:start + batch_size]])
                batch.pop("sample_ids")
                loss = model(**batch, num_items_in_batch=len(samples) * ANSWER).loss  # summed over the epoch
                loss.backward()
                total += loss.detach()
            return total

        return run

    return {name: epoch(order) for name, order in orders.items()}, orders


def part_c(num_samples: int, timed_samples: int, batch_size: int, repeats: int, max_crops: int = 16) -> dict:
    lengths = mixed_lengths(num_samples, max_crops=max_crops)
    shares = {"random": padded_share(lengths, np.random.default_rng(0).permutation(num_samples).tolist(),
                                     batch_size),
              "grouped": padded_share(lengths, list(LengthGroupedSampler(lengths, batch_size, 0)), batch_size)}
    timed = lengths[:timed_samples]
    steps, orders = epoch_steps(timed, batch_size)
    losses = {name: step() for name, step in steps.items()}  # warm-up and check
    torch.testing.assert_close(losses["random"], losses["grouped"], **TOLERANCE)
    seconds = time_alternating(steps, repeats, warmup=0)
    timed_shares = {name: padded_share(timed, order, batch_size) for name, order in orders.items()}
    return {"num_samples": num_samples, "batch_size": batch_size, "max_crops": max_crops,
            "mean_tokens": float(np.mean(lengths)),
            "padded_share": shares, "timed_samples": timed_samples, "timed_padded_share": timed_shares,
            "timed_tokens": sum(timed), "epoch_loss": float(losses["random"]), "epoch_seconds": seconds}


# ------------------------------------------------------------------------------------------------- report


def report(a: dict, b: dict, c: dict) -> str:
    ta, peaks = {k: median(v) for k, v in a["seconds"].items()}, a["peak_bytes"]
    memory = peaks["ours"] is not None
    rows_a = [[name, f"{ta[name]:.2f} s", mib(peaks[name]) if memory else "-"] for name in ("native", "ours")]
    rows_a.append(["native / ours", ratio(ta["native"], ta["ours"]),
                   ratio(peaks["native"], peaks["ours"]) if memory else "-"])
    te, tm = ({k: median(v) for k, v in b[key].items()} for key in ("embedding_seconds", "model_seconds"))
    crops = b["crops_encoded"]
    rows_b = [["native (every crop)", crops["native"], f"{te['native']:.2f} s", f"{tm['native']:.2f} s"],
              ["ours (real crops)", crops["ours"], f"{te['ours']:.2f} s", f"{tm['ours']:.2f} s"],
              ["native / ours", ratio(crops["native"], crops["ours"], 2), ratio(te["native"], te["ours"], 2),
               ratio(tm["native"], tm["ours"], 2)]]
    tc, share, timed_share = ({k: (median(v) if isinstance(v, list) else v) for k, v in c[key].items()}
                              for key in ("epoch_seconds", "padded_share", "timed_padded_share"))
    rows_c = [[name, f"{share[name]:.1%}", f"{timed_share[name]:.1%}", f"{tc[name]:.2f} s"]
              for name in ("random", "grouped")]
    rows_c.append(["random / grouped", ratio(share["random"], share["grouped"]) if share["grouped"] else "-",
                   ratio(timed_share["random"], timed_share["grouped"]) if timed_share["grouped"] else "-",
                   ratio(tc["random"], tc["grouped"], 2)])
    check_a, check_b = a["check"], b["check"]
    return "\n\n".join([
        f"**a. LM head on supervised tokens only vs transformers' forward (full logits): one sequence of "
        f"{a['tokens']:,} tokens, {ANSWER} supervised, vocab {VOCAB:,}, tiny Phi-4 (hidden 64), fp32 CPU, "
        f"forward + backward of the whole model**",
        markdown_table(["variant", "time", "peak memory (one step, fresh process)"], rows_a),
        f"Same loss ({check_a['loss']:.4f}, |diff| {check_a['max_abs_diff_loss']:.1e}) and gradients. The full "
        f"logits are {a['tokens']:,} x {VOCAB:,} x 4 B = {mib(a['logits_bytes'])} per tensor (about 3 are alive "
        f"in the loss's backward); ours computes {ANSWER} rows of them.",
        f"**b. SigLIP on real crops only vs transformers' image embedding: a {b['images'][0][0]}x{b['images'][0][1]} "
        f"and a {b['images'][1][0]}x{b['images'][1][1]} image in one batch (input_ids {b['tokens']}), tiny SigLIP "
        "(hidden 32 x 2 layers, 1,024 patches per crop)**",
        markdown_table(["variant", "crops through SigLIP", "image embedding fwd+bwd", "model fwd+bwd"], rows_b),
        f"Same image features (max |diff| {check_b['max_abs_diff_features']:.1e}), loss ({check_b['loss']:.4f}, "
        f"|diff| {check_b['max_abs_diff_loss']:.1e}) and gradients.",
        f"**c. Length-grouped vs random batches (per-GPU batch {c['batch_size']}): one-image samples of mixed "
        f"sizes at num_crops {c['max_crops']} (mean {c['mean_tokens']:,.0f} tokens); padded share over "
        f"{c['num_samples']:,} samples; epoch time over the first {c['timed_samples']} ({c['timed_tokens']:,} "
        "tokens, text only)**",
        markdown_table(["batches", f"padded share ({c['num_samples']:,})",
                        f"padded share ({c['timed_samples']})", "epoch fwd+bwd"], rows_c),
        f"Same summed loss over the epoch ({c['epoch_loss']:.4f}) in both orders.",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1536, help="a: sequence length")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (after the check)")
    parser.add_argument("--samples", type=int, default=4000, help="c: samples for the padded share")
    parser.add_argument("--timed_samples", type=int, default=24, help="c: samples of the timed epoch")
    parser.add_argument("--batch_size", type=int, default=8, help="c: per-GPU batch size")
    parser.add_argument("--num_crops", type=int, default=16, help="c: the processor's largest tile count")
    parser.add_argument("--no_memory", action="store_true", help="a: skip the peak-memory measurement")
    parser.add_argument("--quick", action="store_true", help="small shapes, one round, no memory (~45 s)")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    images = IMAGES
    if args.quick:
        args.tokens, args.repeats, args.samples, args.timed_samples, args.batch_size = 128, 1, 200, 8, 4
        args.num_crops, args.no_memory, images = 2, True, QUICK_IMAGES
    a = part_a(args.tokens, args.repeats, memory=not args.no_memory)
    b = part_b(args.repeats, images)
    c = part_c(args.samples, args.timed_samples, args.batch_size, args.repeats, args.num_crops)
    markdown = report(a, b, c)
    print(markdown)
    results = {"lm_head": a, "real_crops": b, "grouping": c}
    write_json(args.json, "phi4_speedups", results, markdown)
    return results


if __name__ == "__main__":
    main()
