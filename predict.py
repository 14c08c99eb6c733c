"""Ask a fine-tuned (or the base) Phi-3.5-vision about images, video frames, or a whole jsonl file.

    python predict.py OUTPUT_DIR --image page.png --question "What is the total?"          # streams the answer
    python predict.py OUTPUT_DIR --image left.jpg --image right.jpg --question "Same animal?"
    python predict.py OUTPUT_DIR --video clip.avi --num_frames 8 --question "Classify the video ..."
    python predict.py OUTPUT_DIR --jsonl data/ucf101_test.jsonl --image_root data/images --out answers.jsonl

    torchrun --nproc_per_node 4 predict.py OUTPUT_DIR --jsonl test.jsonl --out answers.jsonl      # one GPU each
    python predict.py OUTPUT_DIR --question "Describe it." --image a.png --do_sample --temperature 0.7 --seed 1
    python predict.py OUTPUT_DIR --jsonl test.jsonl --device_map auto --load_in_4bit --system "Answer briefly."

OUTPUT_DIR is any training output: a full model, a merged model (python -m phi3v.export), or a LoRA adapter (its
base model is read from adapter_config.json, or given with --base; --merge_lora merges it after loading). The
prompt is built exactly as in training (images first as <|image_1|>..., then the question, in the chat template,
after the --system message if one is given); decoding stops at <|end|>, greedy unless --do_sample or --num_beams
say otherwise, and sampling repeats itself with the same --seed. The jsonl mode takes any training data format
(ours, LLaVA, messages); under torchrun (or accelerate launch) each process answers a share of the records and the
answers come back in input order; when the records have answers it also prints the accuracy. For serving, see the
README (vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# phi3v before transformers: importing it hides bitsandbytes' import-time notice (see phi3v/__init__.py)
from phi3v.common.errors import Parser, UserError, parse_checked, run_main

# isort: split
import torch
import torch.distributed as dist
from transformers import BitsAndBytesConfig, TextStreamer, set_seed

from phi3v.common.metrics import accuracy
from phi3v.data.conversation import Conversation, Turn, render
from phi3v.data.formats import load_data
from phi3v.data.images import open_image
from phi3v.data.video import describe_error, read_frames
from phi3v.eval.generation import decoding, generate_predictions
from phi3v.models.registry import checkpoint_family
from phi3v.serve.export import adapter_base


def load_for_inference(output_dir: str | Path, base: str | None = None, dtype: torch.dtype = torch.float32,
                       attn_implementation: str = "sdpa", device: str = "cpu", device_map: str | None = None,
                       load_in_4bit: bool = False, merge_lora: bool = False):
    """(model, processor) from a full/merged model directory or a LoRA adapter directory.

    Args:
        device_map: "auto": spread the layers over the GPUs (and CPU) that are there, instead of `device`.
        load_in_4bit: NF4 weights (bitsandbytes), computing in `dtype`.
        merge_lora: merge a LoRA adapter into the weights after loading (faster generation, same answers).
    """
    output_dir = Path(output_dir)
    adapter = (output_dir / "adapter_config.json").exists()
    weights = (base or adapter_base(output_dir)) if adapter else output_dir
    family = checkpoint_family(weights)
    processor = family.processor_class.from_pretrained(output_dir)
    if merge_lora and load_in_4bit and adapter:
        raise UserError("--merge_lora with --load_in_4bit would merge into rounded 4-bit weights: merge in full "
                        "precision with `python -m phi3v.export OUTPUT_DIR MERGED_DIR`, then load MERGED_DIR in 4 bit")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype) \
        if load_in_4bit else None
    placement = device_map or ({"": device} if load_in_4bit else None)  # bitsandbytes places while quantizing
    model = family.model_class.from_pretrained(weights, dtype=dtype, attn_implementation=attn_implementation,
                                       quantization_config=quantization, device_map=placement)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, output_dir)
        model = model.merge_and_unload() if merge_lora else model
    return (model if placement else model.to(device)).eval(), processor


class WithSystemMessage:
    """The processor, with a system message rendered before every conversation that has none of its own (a jsonl
    record's "system" wins): <|system|>\n...<|end|>\n, as the chat template renders it."""

    def __init__(self, processor, system: str):
        self.processor, self.system = processor, system

    def __getattr__(self, name: str):
        if name == "processor":  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __call__(self, *args, **kwargs):
        return self.processor(*args, **kwargs)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        return self.processor.apply_chat_template(messages, add_generation_prompt)


def video_frames(path: str | Path, count: int):
    """The converter's (and training's) frame choice, so questions about videos see what training saw."""
    try:
        return read_frames(path, count)
    except Exception as error:  # any unreadable video: one line naming it
        raise UserError(f"--video {path}: {describe_error(error)}") from error


@torch.no_grad()
def answer(model, processor, question: str, images: list, max_new_tokens: int = 256, stream: bool = False,
           generation_kwargs: dict | None = None) -> str:
    """Answer to one question about `images` (PIL images), optionally printed token by token; greedy unless
    `generation_kwargs` (do_sample, temperature, top_p, top_k, repetition_penalty, num_beams) say otherwise."""
    prompt, images, _ = render(processor, Conversation("question", [Turn(question, None, images)]),
                               for_generation=True)
    inputs = processor(prompt, images or None).to(next(model.parameters()).device)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                            eos_token_id=processor.end_token_ids(), pad_token_id=processor.tokenizer.pad_token_id,
                            **decoding(generation_kwargs))
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def answer_record(sample_id: str, prediction: str, reference) -> str:
    """One line of --out (and of the printed --jsonl answers)."""
    return json.dumps({"id": sample_id, "prediction": prediction, "reference": reference}, ensure_ascii=False)


def generation_settings(args: argparse.Namespace) -> dict:
    """The decoding flags given, as generate() arguments (sampling ones only with --do_sample)."""
    settings = {"do_sample": args.do_sample, "num_beams": args.num_beams,
                "repetition_penalty": args.repetition_penalty}
    if args.do_sample:
        settings.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return {k: v for k, v in settings.items() if v is not None}


def start_processes(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size). Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group, one GPU
    per process (gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if args.question or args.device_map:
        raise UserError("several processes answer a --jsonl file, one GPU each: run --question, or --device_map, "
                        "in a single process (python predict.py ...)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    return dist.get_rank(), world


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a training output (full, merged or LoRA adapter) or a base checkpoint")
    parser.add_argument("--question", help="the question (with --image or --video)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--video", help="a video file: --num_frames evenly spaced frames become the images")
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--jsonl", help="answer every record of a data file in any training format (ours, LLaVA, "
                                        "messages; see the README)")
    parser.add_argument("--image_root", help="folder the jsonl image paths are relative to (default: beside it)")
    parser.add_argument("--out", help="write the answers here, one jsonl record each ({id, prediction, reference}; "
                                      "with --jsonl instead of printing them, with --question as well, id "
                                      "\"question\")")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--base", help="base model of a LoRA adapter (default: from adapter_config.json)")
    parser.add_argument("--num_crops", type=int, help="override the saved num_crops (1 to 16)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float32" if not torch.cuda.is_available() else "bfloat16",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer at the end")
    parser.add_argument("--system", help="a system message before the question (e.g. 'Answer in one word.')")
    group = parser.add_argument_group("decoding (default: greedy, as in evaluation)")
    group.add_argument("--do_sample", action="store_true", help="sample instead of taking the likeliest token")
    group.add_argument("--temperature", type=float, help="with --do_sample (transformers' default 1.0)")
    group.add_argument("--top_p", type=float, help="with --do_sample: nucleus sampling")
    group.add_argument("--top_k", type=int, help="with --do_sample: sample among the k likeliest tokens")
    group.add_argument("--repetition_penalty", type=float, help="> 1 discourages repeating tokens")
    group.add_argument("--num_beams", type=int, help="beam search with this many beams")
    group.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples")
    group = parser.add_argument_group("memory")
    group.add_argument("--device_map", choices=["auto"], help="auto: spread the model over the GPUs (and CPU)")
    group.add_argument("--load_in_4bit", action="store_true", help="NF4 4-bit weights (bitsandbytes, CUDA)")
    group.add_argument("--merge_lora", action="store_true", help="merge a LoRA adapter into the weights on load")
    return parser


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse unusable inputs before the model is loaded (a FIFO or device is refused, never opened)."""
    from phi3v.data.formats import is_hub_id
    from phi3v.data.validation import image_problem

    for flag in ("num_frames", "batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.num_crops is not None and not 1 <= args.num_crops <= 16:  # as training says it
        raise UserError(f"--num_crops must be between 1 and 16, got {args.num_crops}")
    if args.out and (Path(args.out).is_dir() or not Path(args.out).absolute().parent.is_dir()):
        raise UserError(f"--out {args.out}: pass a file name in an existing folder")
    for path in args.image:
        problem = image_problem(path, None)
        if problem:
            raise UserError(f"--{problem}")
    if args.jsonl and not Path(args.jsonl).exists() and not is_hub_id(args.jsonl):
        raise UserError(f"--jsonl {args.jsonl}: no such file")


def main(argv: list[str] | None = None) -> list[dict] | str:
    parser = build_parser()
    args = parse_checked(parser, argv)
    if bool(args.jsonl) == bool(args.question):
        parser.error("pass either --question (with --image/--video) or --jsonl")
    check_inputs(args)

    if (args.temperature or args.top_p or args.top_k) and not args.do_sample:
        raise UserError("--temperature, --top_p and --top_k apply to sampling: add --do_sample")
    rank, world = start_processes(args)
    model, processor = load_for_inference(args.output_dir, args.base, getattr(torch, args.dtype),
                                          args.attn_implementation, args.device, args.device_map,
                                          args.load_in_4bit, args.merge_lora)
    processor = WithSystemMessage(processor, args.system) if args.system else processor
    if args.num_crops is not None:
        processor.num_crops = args.num_crops
    set_seed(args.seed)
    settings = generation_settings(args)
    if args.question:
        images = [open_image(p) for p in args.image]
        images += video_frames(args.video, args.num_frames) if args.video else []
        text = answer(model, processor, args.question, images, args.max_new_tokens, stream=args.stream,
                      generation_kwargs=settings)
        if not args.stream:
            print(text)
        if args.out:
            Path(args.out).write_text(answer_record("question", text, None) + "\n")
        return text

    dataset = load_data(args.jsonl, processor, args.image_root, for_generation=True, num_frames=args.num_frames)
    from phi3v.data.validation import validate

    _, problems = validate(dataset, disable_tqdm=True)
    if problems:
        raise UserError(f"{args.jsonl}: {len(problems)} problem(s); nothing was answered",
                        [str(problem) for problem in problems])
    results = generate_predictions(model, dataset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                   generation_kwargs=settings)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return []  # rank 0 holds every answer, in input order
    lines = [answer_record(r["id"], r["prediction"].strip(), r["reference"]) for r in results]
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
