"""LM head + cross-entropy at the DocVQA shape: logits at the supervised positions only (ours) vs at every position.

    python bench/lm_head_loss.py [--repeats 3] [--json bench/results/lm_head_loss.json]

What: forward + backward of `lm_head` + loss for one DocVQA-sized sequence: 2,443 positions of which ~10 carry a
label (the answer), hidden 3072, vocabulary 32064 (Phi-3.5-vision), fp32 on CPU (fp32 and bf16 on CUDA).
  - ours: `phi3v.models.phi3_v.modeling.supervised_lm_loss`, which applies the head only where the label is not -100;
  - full logits: `lm_head(hidden)` at all positions, then transformers' own `ForCausalLMLoss` (upcast to fp32,
    shift, cross-entropy with ignore_index=-100), which is what `Phi3ForCausalLM` and the official model do.
Two cases: the head trains (full fine-tuning, frozen vision: its 394 MB weight gradient is part of both peaks) and
the head is frozen (the LoRA/QLoRA base weight: only the gradient into the decoder is needed).

How: both variants share the inputs; the first call of each is the warm-up and the check that they give the same
loss and gradients (allclose). Time: then `--repeats` alternating rounds in this process, median. Peak memory: one
step per variant in a fresh process, resident-set growth over the state after setup (see bench/common.py);
`torch.cuda.max_memory_allocated` on CUDA. Targets from the issue: >= 10x less peak memory, >= 5x faster.

Reading the memory column: with a trainable head, ours is essentially the head's weight gradient (32064 x 3072
fp32 = 376 MiB), which any method must produce; the full-logits peak sits earlier, in the log-softmax backward,
where three (L, vocab) fp32 tensors are alive (313 MB each). The frozen-head case isolates what the loss itself
costs. A few MiB of one-off allocations remain in every measurement.

Takes about 4-5 minutes on 2 CPU cores (each full-logits step is ~1.4 TFLOP, ~20-30 s); seconds on a GPU. Ours
is bound by reading the 394 MB head weight (a 10-row matmul), not by arithmetic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/lm_head_loss.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

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
from phi3v.models.phi3_v.modeling import supervised_lm_loss

DOCVQA = dict(positions=2443, supervised=10, hidden_size=3072, vocab_size=32064)
TARGETS = {"memory": 10.0, "speed": 5.0}


def full_logits_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """The usual causal-LM loss: (B, L, vocab) logits everywhere, then transformers' shifted cross-entropy."""
    return ForCausalLMLoss(lm_head(hidden), labels, vocab_size=lm_head.out_features)


VARIANTS = {"ours": supervised_lm_loss, "full logits": full_logits_loss}


def make_inputs(positions: int, supervised: int, hidden_size: int, vocab_size: int, trainable_head: bool = True,
                dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """(hidden (1, L, H) requiring grad, labels (1, L) with `supervised` targets at the end, lm_head)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, positions, hidden_size, generator=generator).to(device, getattr(torch, dtype))
    hidden.requires_grad_(True)  # the gradient flows on into the decoder in every mode
    labels = torch.full((1, positions), -100, dtype=torch.long)
    # the answer's tokens sit at the end; label t is predicted at position t - 1, so `supervised` targets in all
    labels[0, positions - supervised:] = torch.randint(0, vocab_size, (supervised,), generator=generator)
    lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
    nn.init.normal_(lm_head.weight, std=0.02, generator=generator)  # the model's initializer_range
    lm_head = lm_head.to(device, getattr(torch, dtype)).requires_grad_(trainable_head)
    return hidden, labels.to(device), lm_head


def make_steps(variants=tuple(VARIANTS), **shape) -> dict:
    """{variant: step} on shared inputs. A step is forward+backward with gradients reset to None first (as after
    `optimizer.zero_grad()`); it returns (loss, hidden gradient, lm_head weight gradient or None)."""
    hidden, labels, lm_head = make_inputs(**shape)

    def step_for(loss_fn):
        def step():
            hidden.grad = lm_head.weight.grad = None
            loss = loss_fn(hidden, labels, lm_head)
            loss.backward()
            return loss.detach(), hidden.grad, lm_head.weight.grad

        return step

    return {name: step_for(VARIANTS[name]) for name in variants}


def make_step(variant: str, **shape):
    """One variant's step, on its own (the setup `peak_memory` runs in a fresh process)."""
    return make_steps((variant,), **shape)[variant]


def check_same(results: dict, dtype: str = "float32") -> dict:
    """Raise unless both variants gave the same loss and gradients; returns the largest differences."""
    (loss_a, hidden_a, weight_a), (loss_b, hidden_b, weight_b) = results.values()
    tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss_a.float(), loss_b.float(), **tolerance)
    torch.testing.assert_close(hidden_a.float(), hidden_b.float(), **tolerance)
    if weight_a is not None:
        torch.testing.assert_close(weight_a.float(), weight_b.float(), **tolerance)
    return {"loss": float(loss_a), "max_abs_diff_loss": float((loss_a.float() - loss_b.float()).abs()),
            "max_abs_diff_hidden_grad": float((hidden_a.float() - hidden_b.float()).abs().max()),
            "max_abs_diff_weight_grad": None if weight_a is None else float((weight_a - weight_b).abs().max())}


def run(shape: dict, repeats: int, measure_memory: bool = True) -> list[dict]:
    """One result per case (trainable / frozen head): check, times and peak memory of both variants."""
    device = shape.get("device", "cpu")
    cases = []
    for trainable_head in (True, False):
        case_shape = {**shape, "trainable_head": trainable_head}
        steps = make_steps(**case_shape)
        # The first call of each variant is the warm-up and gives the results to compare.
        check = check_same({name: step() for name, step in steps.items()}, shape.get("dtype", "float32"))
        seconds = time_alternating(steps, repeats=repeats, warmup=0, device=device)
        del steps
        memory = {name: peak_memory("bench.lm_head_loss:make_step", {"variant": name, **case_shape}, device)
                  if measure_memory else None for name in VARIANTS}
        cases.append({"trainable_head": trainable_head, "check": check, "seconds": seconds,
                      "median_seconds": {name: median(s) for name, s in seconds.items()}, "peak_bytes": memory})
    return cases


def report(cases: list[dict], shape: dict) -> str:
    rows, summary = [], []
    for case in cases:
        head = "trains" if case["trainable_head"] else "frozen (LoRA base)"
        times, memory = case["median_seconds"], case["peak_bytes"]
        for name in VARIANTS:
            rows.append([head, name, f"{times[name] * 1e3:,.1f} ms",
                         mib(memory[name]) if memory[name] is not None else "-"])
        speedup = times["full logits"] / times["ours"]
        saving = memory["full logits"] / memory["ours"] if memory["ours"] else None
        case["speedup"], case["memory_saving"] = speedup, saving
        met = [f"speed {'met' if speedup >= TARGETS['speed'] else 'NOT met'}"]
        if saving is not None:
            met.append(f"memory {'met' if saving >= TARGETS['memory'] else 'NOT met'}")
        summary.append([head, ratio(times["full logits"], times["ours"]),
                        ratio(memory["full logits"], memory["ours"]) if saving is not None else "-", ", ".join(met)])
    title = (f"LM head + loss, {shape['positions']:,} positions ({shape['supervised']} supervised), hidden "
             f"{shape['hidden_size']}, vocab {shape['vocab_size']:,}, {shape['dtype']} on {shape['device']}; "
             "forward+backward, median of the timed rounds; peak = memory growth of one step")
    check = cases[0]["check"]
    checked = (f"Same loss ({check['loss']:.4f}) and gradients in both cases (max |diff|: hidden grad "
               f"{check['max_abs_diff_hidden_grad']:.1e}, lm_head grad {check['max_abs_diff_weight_grad']:.1e}).")
    return "\n\n".join([
        f"**{title}**",
        markdown_table(["lm_head", "variant", "time", "peak memory"], rows),
        markdown_table(["lm_head", "speed-up (full / ours)", "memory saving (full / ours)",
                        f"targets (>= {TARGETS['speed']:.0f}x faster, >= {TARGETS['memory']:.0f}x less memory)"],
                       summary),
        checked,
    ])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=DOCVQA["positions"], help="sequence length")
    parser.add_argument("--supervised", type=int, default=DOCVQA["supervised"], help="positions with a label")
    parser.add_argument("--hidden_size", type=int, default=DOCVQA["hidden_size"])
    parser.add_argument("--vocab_size", type=int, default=DOCVQA["vocab_size"])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="float32 and/or bfloat16 (default: float32 on CPU, both on CUDA)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per variant (after the warm-up)")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    add_json_argument(parser)
    args = parser.parse_args(argv)

    dtypes = args.dtypes or (["float32", "bfloat16"] if args.device.startswith("cuda") else ["float32"])
    results, sections = [], []
    for dtype in dtypes:
        shape = dict(positions=args.positions, supervised=args.supervised, hidden_size=args.hidden_size,
                     vocab_size=args.vocab_size, dtype=dtype, device=args.device)
        cases = run(shape, args.repeats, measure_memory=not args.no_memory)
        results.append({"shape": shape, "cases": cases})
        sections.append(report(cases, shape))
    markdown = "\n\n".join(sections)
    print(markdown)
    write_json(args.json, "lm_head_loss", {"targets": TARGETS, "runs": results}, markdown)
    return results


if __name__ == "__main__":
    main()
