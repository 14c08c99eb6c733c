"""Ask a fine-tuned (or the base) Phi-3.5-vision about images, video frames, or a whole jsonl file.

    python predict.py OUTPUT_DIR --image page.png --question "What is the total?"          # streams the answer
    python predict.py OUTPUT_DIR --image left.jpg --image right.jpg --question "Same animal?"
    python predict.py OUTPUT_DIR --video clip.avi --num_frames 8 --question "Classify the video ..."
    python predict.py OUTPUT_DIR --jsonl data/ucf101_test.jsonl --image_root data/images --out answers.jsonl

OUTPUT_DIR is any training output: a full model, a merged model (python -m phi3v.export), or a LoRA adapter (its
base model is read from adapter_config.json, or given with --base). The prompt is built exactly as in training
(images first as <|image_1|>..., then the question, in the chat template), decoding is greedy and stops at <|end|>.
The jsonl mode takes the training format; when the records have answers it also prints the accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import TextStreamer

from phi3v.data import Conversation, Turn, jsonl_dataset, open_image, render
from phi3v.errors import UserError, run_main
from phi3v.generation import generate_predictions
from phi3v.metrics import accuracy
from phi3v.modeling import Phi3VForCausalLM
from phi3v.processing import Phi3VProcessor
from phi3v.video import describe_error, read_frames


def load_for_inference(output_dir: str | Path, base: str | None = None, dtype: torch.dtype = torch.float32,
                       attn_implementation: str = "sdpa", device: str = "cpu"):
    """(model, processor) from a full/merged model directory or a LoRA adapter directory."""
    output_dir = Path(output_dir)
    processor = Phi3VProcessor.from_pretrained(output_dir)
    if (output_dir / "adapter_config.json").exists():
        from peft import PeftModel

        from phi3v.export import adapter_base

        model = Phi3VForCausalLM.from_pretrained(base or adapter_base(output_dir), dtype=dtype,
                                                 attn_implementation=attn_implementation)
        model = PeftModel.from_pretrained(model, output_dir)
    else:
        model = Phi3VForCausalLM.from_pretrained(output_dir, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), processor


def video_frames(path: str | Path, count: int):
    """The converter's (and training's) frame choice, so questions about videos see what training saw."""
    try:
        return read_frames(path, count)
    except Exception as error:  # any unreadable video: one line naming it
        raise UserError(f"--video {path}: {describe_error(error)}") from error


@torch.no_grad()
def answer(model, processor, question: str, images: list, max_new_tokens: int = 256, stream: bool = False) -> str:
    """Greedy answer to one question about `images` (PIL images), optionally printed token by token."""
    prompt, images, _ = render(processor, Conversation("question", [Turn(question, None, images)]),
                               for_generation=True)
    inputs = processor(prompt, images or None).to(next(model.parameters()).device)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                            eos_token_id=processor.end_token_ids(), pad_token_id=processor.tokenizer.pad_token_id)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a training output (full, merged or LoRA adapter) or a base checkpoint")
    parser.add_argument("--question", help="the question (with --image or --video)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--video", help="a video file: --num_frames evenly spaced frames become the images")
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--jsonl", help="answer every record of a jsonl file in the training format")
    parser.add_argument("--image_root", help="folder the jsonl image paths are relative to (default: beside it)")
    parser.add_argument("--out", help="write the jsonl answers here (default: print them)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--base", help="base model of a LoRA adapter (default: from adapter_config.json)")
    parser.add_argument("--num_crops", type=int, help="override the saved num_crops")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float32" if not torch.cuda.is_available() else "bfloat16",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer at the end")
    return parser


def main(argv: list[str] | None = None) -> list[dict] | str:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.jsonl) == bool(args.question):
        parser.error("pass either --question (with --image/--video) or --jsonl")

    model, processor = load_for_inference(args.output_dir, args.base, getattr(torch, args.dtype),
                                          args.attn_implementation, args.device)
    if args.num_crops:
        processor.image_processor.num_crops = args.num_crops
    if args.question:
        images = [open_image(p) for p in args.image]
        images += video_frames(args.video, args.num_frames) if args.video else []
        text = answer(model, processor, args.question, images, args.max_new_tokens, stream=args.stream)
        if not args.stream:
            print(text)
        return text

    dataset = jsonl_dataset(args.jsonl, args.image_root or Path(args.jsonl).parent, processor, for_generation=True)
    if dataset.load_problems:
        raise UserError(f"{args.jsonl}: {len(dataset.load_problems)} unreadable line(s)",
                        [str(problem) for problem in dataset.load_problems])
    results = generate_predictions(model, dataset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    lines = [json.dumps({"id": r["id"], "prediction": r["prediction"].strip(), "reference": r["reference"]},
                        ensure_ascii=False) for r in results]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} answers written to {args.out}")
    else:
        print("\n".join(lines))
    if all(isinstance(r["reference"], str) for r in results):
        print(f"accuracy {accuracy([r['prediction'] for r in results], [r['reference'] for r in results]):.4f}")
    return results


if __name__ == "__main__":
    run_main(main)
