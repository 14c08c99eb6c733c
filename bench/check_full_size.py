"""The 4.2B path end to end on CPU: official config, random weights, bf16; LoRA and QLoRA; save, merged export, reload.

    make check-full-size                      # = /usr/bin/time -v python bench/check_full_size.py
    python bench/check_full_size.py --work_dir /tmp/full   # keep the files (8.3 GB checkpoint + outputs)

Stages, each in its own process so that their memory does not add up (the peak resident set of each is printed):

1. build: `Phi3VForCausalLM(Phi3VConfig.official())` with random weights in bf16, saved in the official layout
   with a processor (the tiny builder's tokenizer, official special-token ids) at num_crops 4, and a one-page
   dataset (a 1700x2200 page: 4 crops + the global view, ~780 tokens);
2. lora: the recipe (`finetune_hf_trainer_ucf101.py --train_file ...`) with --use_lora --bf16 --torch_dtype bfloat16
   (bf16 base, fp32 adapters), one optimizer step on the page, adapter saved;
3. qlora: the same with --use_qlora (NF4 base through bitsandbytes' CPU backend);
4. export: `python -m phi3v.export` of the LoRA output (merged, bf16, official layout);
5. reload: the merged checkpoint loads with `Phi3VForCausalLM.from_pretrained`, has the official tensor names, and
   one forward on the page gives finite logits.

Phi-4-multimodal-instruct, in seconds, without weights (`--stages phi4_meta`, `make check-phi4-meta`): the
official native config (phi3v/models/phi4_mm/configs/phi-4-multimodal-instruct.json) built on the meta device with
our Phi4MultimodalForCausalLM: the state dict's tensor names with their counts equal bench/phi4_tensor_names.txt
(98 name patterns, layer numbers as N: 1,536 tensors, 1,535 saved since lm_head is tied to the embeddings), the
parameter count per part (4,743,988,032 in all), the official shapes (decoder 3072 x 32 layers, 24 heads, 8 KV heads,
vocabulary 200,064; SigLIP 1152 x 27 layers, MLP 4304, 16 heads, 448/14 patches) and the family seam's view of it
(LoRA targets, never-used weights).

Not run by default: `random_adapter`, an adapter for the export without the lora stage's training (~17 min at full
size): the recipe's LoRA config (rank 64, alpha 128, its default targets) on the base, B matrices random instead of
zero, saved where the lora stage saves (`--stages build random_adapter export reload`).

Each stage must work; the script runs them all (the reload only after an export) and exits 1 naming the failed
ones. Needs ~20 GB of disk; memory per stage is printed (and checked before the export, which holds one 5 GB shard
of the merged model at a time: ~7 GB).
Run it by hand, not in CI: it takes tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/check_full_size.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
STAGES = ("build", "lora", "qlora", "export", "reload")
EXTRA_STAGES = ("random_adapter", "phi4_meta")
PHI4_TENSOR_NAMES = REPO / "bench" / "phi4_tensor_names.txt"  # "<count>\t<name, layer numbers as N>" per line
# parameters per part (phi3v.models.phi4_mm.family.part_of) of the official model, as counted on the meta device;
# they agree with the notes' independent count (LM 3.836B, SigLIP 428.6M, projector 13.0M, audio 466.4M)
PHI4_PARAMETERS = {"language": 3_836_021_760, "vision": 428_565_440, "projector": 12_984_576, "audio": 466_416_256}


def recipe_args(work: Path, out: str, *mode: str) -> list[str]:
    data = work / "data"
    return ["--model_name_or_path", str(work / "base"), "--train_file", str(data / "train.jsonl"),
            "--eval_file", str(data / "val.jsonl"), "--image_root", str(data), "--output_dir", str(work / out),
            "--num_crops", "4", "--bf16", "--max_steps", "1", "--batch_size", "1", "--batch_size_per_gpu", "1",
            "--dataloader_num_workers", "0", "--eval_before_training", "False", "--eval_after_training", "False",
            "--save_strategy", "no", "--report_to", "none", "--no-tqdm", "--logging_steps", "1", *mode]


def stage_build(work: Path, tiny: bool) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from phi3v.models.phi3_v.configuration import Phi3VConfig
    from phi3v.models.phi3_v.image_processing import Phi3VImageProcessor
    from phi3v.models.phi3_v.modeling import Phi3VForCausalLM
    from phi3v.models.phi3_v.processing import Phi3VProcessor
    from phi3v.models.phi3_v.tiny import build_tokenizer, tiny_config

    torch.manual_seed(0)
    model = Phi3VForCausalLM._from_config(tiny_config() if tiny else Phi3VConfig.official(), dtype=torch.bfloat16)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    model.save_pretrained(work / "base")
    del model
    Phi3VProcessor(Phi3VImageProcessor(num_crops=4), build_tokenizer()).save_pretrained(work / "base")
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    page = np.full((2200, 1700, 3), 255, dtype=np.uint8)
    page[200:2000:40, 150:1550] = np.random.default_rng(0).integers(0, 120, (45, 1400, 3))  # lines of "text"
    Image.fromarray(page).save(data / "page.png")
    record = {"id": "page-1", "conversations": [
        {"images": ["page.png"], "user": "What is the total?", "assistant": "42"}]}
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text(json.dumps(record) + "\n")


def stage_recipe(work: Path, out: str, *mode: str) -> None:
    import finetune_hf_trainer_ucf101 as recipe

    recipe.main(recipe_args(work, out, *mode))
    results = json.loads((work / out / "train_results.json").read_text())
    assert results["train_loss"] == results["train_loss"], "the training loss is NaN"
    assert (work / out / "adapter_model.safetensors").is_file(), "no adapter was saved"
    print(f"{out}: one step, train_loss {results['train_loss']:.3f}, adapter saved", flush=True)


def stage_random_adapter(work: Path) -> None:
    import torch

    from phi3v.models.phi3_v.modeling import Phi3VForCausalLM
    from phi3v.models.phi3_v.processing import Phi3VProcessor
    from phi3v.train.arguments import ModelArguments
    from phi3v.train.loading import AdapterModel, get_peft_config

    model = Phi3VForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)  # as the lora stage loads it
    config = get_peft_config(ModelArguments(model_name_or_path=str(work / "base"), use_lora=True), model)
    adapter = AdapterModel(model, config)  # fp32 adapters, as in training
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_B" in name:  # zero at init: the merge would change nothing
                param.normal_(std=0.01)
    adapter.save_pretrained(work / "lora")
    Phi3VProcessor.from_pretrained(work / "base").save_pretrained(work / "lora")
    print(f"random adapter: {len(config.target_modules)} target modules, rank {config.r}", flush=True)


def stage_export(work: Path) -> None:
    needed = 5 * 10**9 + 2 * 2**30  # the merge holds one 5 GB output shard at a time, plus the adapter and slack
    available = available_memory()
    if available is not None and available < needed:
        raise MemoryError(f"the merged export holds a 5 GB shard (~{needed / 2**30:.1f} GiB in all); only "
                          f"{available / 2**30:.1f} GiB is available")
    from phi3v.serve.export import main as export_main

    export_main([str(work / "lora"), str(work / "merged"), "--dtype", "bfloat16"])


def stage_reload(work: Path) -> None:
    import torch
    from PIL import Image
    from safetensors import safe_open

    from phi3v.models.phi3_v.modeling import Phi3VForCausalLM
    from phi3v.models.phi3_v.processing import Phi3VProcessor

    def names(folder: Path) -> set[str]:
        found = set()
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                found |= set(f.keys())
        return found

    merged = work / "merged"
    assert names(merged) == names(work / "base"), "the merged export's tensor names differ from the official ones"
    model = Phi3VForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    processor = Phi3VProcessor.from_pretrained(merged)
    inputs = processor("<|user|>\n<|image_1|>\nWhat is the total?<|end|>\n<|assistant|>\n",
                       [Image.open(work / "data" / "page.png")])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all(), "non-finite logits after reload"
    print(f"reloaded: {inputs['input_ids'].shape[1]} tokens, finite logits", flush=True)


def stage_phi4_meta() -> None:
    import re
    from collections import Counter

    import torch
    from transformers import Phi4MultimodalConfig

    from phi3v.models.phi4_mm import family
    from phi3v.models.phi4_mm.modeling import Phi4MultimodalForCausalLM
    from phi3v.models.phi4_mm.tiny import OFFICIAL_CONFIG

    config = Phi4MultimodalConfig(**json.loads(OFFICIAL_CONFIG.read_text()))
    with torch.device("meta"):
        model = Phi4MultimodalForCausalLM(config)
    names = list(model.state_dict())
    found = Counter(re.sub(r"\.\d+\.", ".N.", name) for name in names)
    expected = Counter({name: int(count) for count, name in
                        (line.split("\t") for line in PHI4_TENSOR_NAMES.read_text().splitlines() if line)})
    assert found == expected, ("tensor names differ from bench/phi4_tensor_names.txt: missing "
                               f"{sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]}")
    assert len(names) == 1536, len(names)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight, "lm_head untied"
    saved = [name for name in names if name not in model._tied_weights_keys]  # what save_pretrained writes
    assert len(saved) == 1535, len(saved)

    parts = Counter()
    for name, parameter in model.named_parameters():  # each shared parameter once (lm_head is the embeddings)
        parts[family.part_of(name)] += parameter.numel()
    assert dict(parts) == PHI4_PARAMETERS, f"parameters per part {dict(parts)}, expected {PHI4_PARAMETERS}"
    total = sum(parts.values())

    shapes = dict(model.state_dict().items())
    vision = "model.embed_tokens_extend.image_embed.img_processor."
    layer = "model.layers.0."
    expected_shapes = {
        "model.embed_tokens.weight": (200064, 3072), f"{layer}self_attn.qkv_proj.weight": (5120, 3072),
        f"{layer}self_attn.o_proj.weight": (3072, 3072), f"{layer}mlp.gate_up_proj.weight": (16384, 3072),
        f"{layer}mlp.down_proj.weight": (3072, 8192),
        f"{vision}embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        f"{vision}embeddings.position_embedding.weight": (1024, 1152),
        f"{vision}encoder.layers.26.self_attn.q_proj.weight": (1152, 1152),
        f"{vision}encoder.layers.26.mlp.fc1.weight": (4304, 1152),
        "model.embed_tokens_extend.image_embed.img_projection_up.weight": (3072, 1152),
    }
    for name, shape in expected_shapes.items():
        assert tuple(shapes[name].shape) == shape, f"{name}: {tuple(shapes[name].shape)}, expected {shape}"
    text, siglip = config, config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (32, 24, 8)
    assert (siglip.num_hidden_layers, siglip.hidden_size, siglip.num_attention_heads) == (27, 1152, 16)
    assert (siglip.image_size, siglip.patch_size, siglip.feature_layer) == (448, 14, -2)

    modules = dict(model.named_modules())
    targets = family.lora_targets(model)
    assert len(targets) == 32 * 4 + 26 * 6 + 2 and all(isinstance(modules[t], torch.nn.Linear) for t in targets)
    unused = sum(p.numel() for p in family.unused_parameters(model))
    # + SigLIP's last layer (15,239,504), post_layernorm (2,304) and pooling head (15,238,352)
    assert unused == PHI4_PARAMETERS["audio"] + 30_480_160, unused
    print(f"Phi-4-multimodal on meta: {len(names)} tensors ({len(saved)} saved, lm_head tied), "
          f"{len(expected)} name patterns as bench/phi4_tensor_names.txt, {total:,} parameters "
          f"({', '.join(f'{k} {v / 1e6:,.1f}M' for k, v in parts.items())}); SigLIP {siglip.hidden_size} x "
          f"{siglip.num_hidden_layers} layers; {len(targets)} LoRA targets; {unused / 1e6:,.1f}M never used",
          flush=True)


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_stage(name: str, work: Path, tiny: bool) -> None:
    started = time.time()
    if name == "build":
        stage_build(work, tiny)
    elif name == "lora":
        stage_recipe(work, "lora", "--use_lora", "--torch_dtype", "bfloat16")
    elif name == "qlora":
        stage_recipe(work, "qlora", "--use_qlora")
    elif name == "random_adapter":
        stage_random_adapter(work)
    elif name == "export":
        stage_export(work)
    elif name == "phi4_meta":
        stage_phi4_meta()
    else:
        stage_reload(work)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"STAGE {name}: ok in {time.time() - started:.0f} s, peak resident {peak:.1f} GiB", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=None, help="keep everything here (default: a temp folder)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES + EXTRA_STAGES)
    parser.add_argument("--tiny", action="store_true", help="the tiny config instead: the same path in a minute")
    parser.add_argument("--_stage", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._stage:
        run_stage(args._stage, args.work_dir, args.tiny)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        failed = []
        for stage in args.stages:
            if stage == "reload" and "export" in failed:
                failed.append(stage)  # nothing to reload
                print("STAGE reload: not run, the export failed", flush=True)
                continue
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_stage", stage,
                                   "--work_dir", str(work), *(["--tiny"] if args.tiny else [])], cwd=REPO,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode != 0:
                print(f"STAGE {stage}: FAILED (exit {done.returncode})", flush=True)
                failed.append(stage)
                if stage == "build":
                    break
    if failed:
        print("full-size check FAILED: " + ", ".join(failed))
        return 1
    print("full-size check passed: " + ", ".join(args.stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
