"""Plant realistic defects one at a time and check that the tests catch each: `make mutants`.

For each defect below: the text `old` of `file` is replaced by `new` (it must occur exactly once), the listed test
files run (`-m "not slow" -x`), and the file is restored. A defect is *killed* when the tests fail. It prints one line
per defect and `killed K/N`, and exits 1 unless every defect is killed.

The original file is restored in a `finally` block, on SIGINT/SIGTERM too, and a copy of it waits in .mutants-backup/
while a defect is planted: if the process was killed outright (SIGKILL, power loss), the next run restores it first.
A defect whose `old` text is no longer in the code is reported as `stale` (the code moved on: update the list).

    python tests/mutants.py                 # all
    python tests/mutants.py -k anls roc     # the defects whose name contains one of these words
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKUP = ROOT / ".mutants-backup"


@dataclass
class Mutant:
    name: str
    file: str
    edits: list[tuple[str, str]]  # (old, new), each old occurring exactly once in the file
    tests: list[str]


def edit(old: str, new: str) -> list[tuple[str, str]]:
    return [(old, new)]


MUTANTS = [
    # --- the 11 defects that survived the tests before (issue 14)
    Mutant("resize bicubic instead of bilinear", "phi3v/models/phi3_v/image_processing.py",
           [("image.resize((image.width, new_h), Image.Resampling.BILINEAR)",
             "image.resize((image.width, new_h), Image.Resampling.BICUBIC)"),
            ("return image.resize((new_w, new_h), Image.Resampling.BILINEAR)",
             "return image.resize((new_w, new_h), Image.Resampling.BICUBIC)")],
           ["tests/test_image_processing.py"]),
    Mutant("LongRoPE switch at 4095 tokens", "phi3v/models/phi3_v/modeling.py",
           edit("is_long = (position_ids.amax(-1, keepdim=True) + 1 > original)",
                "is_long = (position_ids.amax(-1, keepdim=True) + 1 >= original)"),
           ["tests/test_modeling.py"]),
    Mutant("image features one position late", "phi3v/models/phi3_v/modeling.py",
           edit("inputs_embeds.masked_scatter(mask[..., None]",
                "inputs_embeds.masked_scatter(mask.roll(1, 1)[..., None]"),
           ["tests/test_modeling.py"]),
    Mutant("LoRA without mlp.down_proj", "phi3v/models/family.py",
           edit('"mlp.gate_up_proj", "mlp.down_proj")', '"mlp.gate_up_proj")'),
           ["tests/test_model_loading.py"]),
    Mutant("gradient accumulation ignores the world size", "phi3v/train/training_arguments.py",
           edit("self.gradient_accumulation_steps = self.batch_size // (per_gpu * world)",
                "self.gradient_accumulation_steps = self.batch_size // per_gpu"),
           ["tests/test_args.py"]),
    Mutant("no fsync before the checkpoint-complete marker", "phi3v/train/checkpoints.py",
           edit('        with open(path, "rb") as f:\n            os.fsync(f.fileno())\n', "        pass\n"),
           ["tests/test_training.py"]),
    Mutant("ANLS <= at the threshold", "phi3v/common/metrics.py",
           edit("1 - distance if distance < threshold else 0.0", "1 - distance if distance <= threshold else 0.0"),
           ["tests/test_metrics.py"]),
    Mutant("standard ANLS case-sensitive", "phi3v/common/metrics.py",
           [('prediction = " ".join(prediction.lower().split())', 'prediction = " ".join(prediction.split())'),
            ('references = [" ".join(r.lower().split()) for r in references]',
             'references = [" ".join(r.split()) for r in references]')],
           ["tests/test_metrics.py"]),
    Mutant("accuracy without stripping whitespace", "phi3v/common/metrics.py",
           edit('return text.strip().strip(".").lower()', 'return text.strip(".").lower()'),
           ["tests/test_metrics.py"]),
    Mutant("ROC AUC with the positive class swapped", "phi3v/common/metrics.py",
           [("positives = sum(1 for label in labels if label)", "positives = sum(1 for label in labels if not label)"),
            ("for score, label in zip(scores, labels) if label)",
             "for score, label in zip(scores, labels) if not label)")],
           ["tests/test_metrics.py"]),
    Mutant("generation batches right-padded", "phi3v/eval/generation.py",
           edit('padding_side="left"', 'padding_side="right"'),
           ["tests/test_generation.py"]),
    # --- more of the kind: image embedding, processor, labels, loss, metrics, the 128k config
    Mutant("2x2 merge channel order", "phi3v/models/phi3_v/image_embedding.py",
           edit(".permute(0, 1, 3, 2, 4, 5)  # (crops, row, col, dy, dx, C)",
                ".permute(0, 1, 3, 4, 2, 5)  # (crops, row, col, dy, dx, C)"),
           ["tests/test_modeling.py"]),
    Mutant("global view before the sub grid (glb_sub)", "phi3v/models/phi3_v/image_embedding.py",
           edit("pieces += [with_newlines(sub, self.sub_GN), self.glb_GN.reshape(1, -1).to(sub.dtype),\n"
                "                       with_newlines(glb, self.sub_GN)]",
                "pieces += [with_newlines(glb, self.sub_GN), self.glb_GN.reshape(1, -1).to(sub.dtype),\n"
                "                       with_newlines(sub, self.sub_GN)]"),
           ["tests/test_modeling.py"]),
    Mutant("CLIP features from the last layer", "phi3v/models/phi3_v/image_embedding.py",
           edit('layer_idx = config.img_processor.get("layer_idx", -2)',
                'layer_idx = config.img_processor.get("layer_idx", -1)'),
           ["tests/test_modeling.py"]),
    Mutant("loss without the next-token shift", "phi3v/models/causal_lm.py",
           edit("targets = F.pad(labels, (0, 1), value=-100)[:, 1:]", "targets = labels"),
           ["tests/test_modeling.py"]),
    Mutant("128k: short and long factors swapped", "phi3v/models/phi3_v/configuration.py",
           edit('"rope_type": "longrope", "short_factor": list(rope_scaling["short_factor"]),\n'
                '                "long_factor": list(rope_scaling["long_factor"]),',
                '"rope_type": "longrope", "short_factor": list(rope_scaling["long_factor"]),\n'
                '                "long_factor": list(rope_scaling["short_factor"]),'),
           ["tests/test_phi3_vision_128k.py"]),
    Mutant("padding at the top instead of centred", "phi3v/models/phi3_v/image_processing.py",
           edit("top, left = (padded_h - new_h) // 2, (padded_w - new_w) // 2", "top, left = 0, 0"),
           ["tests/test_image_processing.py"]),
    Mutant("newline count by columns", "phi3v/models/phi3_v/image_processing.py",
           edit("return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * 12",
                "return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (cols + 1) * 12"),
           ["tests/test_image_processing.py"]),
    Mutant("no BOS after an image", "phi3v/models/family.py",
           edit("return_offsets_mapping=True, add_special_tokens=add_special_tokens)",
                "return_offsets_mapping=True, add_special_tokens=add_special_tokens and start == 0)"),
           ["tests/test_processing.py", "tests/test_real_vocab.py"]),
    Mutant("final <|endoftext|> not supervised", "phi3v/data/conversation.py",
           edit("    spans[-1] = (spans[-1][0], len(text))\n", ""),
           ["tests/test_real_vocab.py", "tests/test_data.py"]),
    Mutant("edit distance counts a substitution twice", "phi3v/common/metrics.py",
           edit("previous[j - 1] + (char_a != char_b)", "previous[j - 1] + 2 * (char_a != char_b)"),
           ["tests/test_metrics.py"]),
    # --- issue 15: the faster image processor
    Mutant("global view taps summed in index order", "phi3v/models/phi3_v/image_processing.py",
           edit("for j in (1, 0, 2, 3):", "for j in (0, 1, 2, 3):"),
           ["tests/test_image_processing.py", "tests/test_processor_unchanged.py"]),
    Mutant("normalize divides by std before subtracting the mean", "phi3v/models/phi3_v/image_processing.py",
           edit("values.sub_(mean[channel]).div_(std[channel])", "values.div_(std[channel]).sub_(mean[channel])"),
           ["tests/test_processor_unchanged.py"]),
    # issue 22
    Mutant("LoRA dropout not passed to PEFT", "phi3v/train/loading.py",
           edit("lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,",
                "lora_alpha=model_args.lora_alpha,"),
           ["tests/test_scripts_ucf101.py::test_every_lora_flag_reaches_the_trained_adapter"]),
    Mutant("validation cache ignores the mtime", "phi3v/data/validation_cache.py",
           edit("return [info.st_size, info.st_mtime_ns]", "return [info.st_size]"),
           ["tests/test_own_data.py"]),
    # --- issue 22: entry points
    Mutant("a misspelt flag gets no suggestion", "phi3v/common/errors.py",
           edit("close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)", "close = []"),
           ["tests/test_args.py"]),
    Mutant("an interrupted validation keeps nothing", "phi3v/data/validation.py",
           edit("                cache.save()\n            raise", "                pass\n            raise"),
           ["tests/test_own_data.py"]),
    Mutant("evaluation loss without the system prompt", "phi3v/eval/loss.py",
           edit("dataclasses.replace(conversation, turns=", "dataclasses.replace(conversation, system=None, turns="),
           ["tests/test_eval_loss.py"]),
    Mutant("a hub split keyed without its files", "finetune_hf_trainer_nlvr2.py",
           edit("data_args.max_image_pixels, sources=arrow_files(rows))", "data_args.max_image_pixels)"),
           ["tests/test_scripts_tasks.py"]),
    # --- Phi-4-multimodal (phi3v/models/phi4_mm)
    Mutant("Phi-4 SigLIP left causal under sdpa", "phi3v/models/phi4_mm/modeling.py",
           edit("                module.is_causal = False", "                module.is_causal = True"),
           ["tests/test_phi4_mm.py"]),
    Mutant("Phi-4 image tokens without the separator", "phi3v/models/phi4_mm/processing.py",
           edit("return 256 + 16 + 1 + pooled_h * (pooled_w + 1)", "return 256 + 16 + pooled_h * (pooled_w + 1)"),
           ["tests/test_phi4_mm.py"]),
    Mutant("Phi-4 vision LoRA not merged", "phi3v/models/phi4_mm/modeling.py",
           edit("            merge_lora(model, *adapter)\n", "            pass\n"),
           ["tests/test_phi4_mm.py"]),
    Mutant("Phi-4 padding crops masked out", "phi3v/models/phi4_mm/processing.py",
           edit("padding_value=1)", "padding_value=0)"),
           ["tests/test_phi4_mm.py"]),
]


def restore_leftovers() -> None:
    """Put back any file a killed run left mutated (its original waits in .mutants-backup/)."""
    if not BACKUP.exists():
        return
    for saved in BACKUP.rglob("*"):
        if saved.is_file():
            target = ROOT / saved.relative_to(BACKUP)
            shutil.copy2(saved, target)
            print(f"restored {target.relative_to(ROOT)} left mutated by an interrupted run")
    shutil.rmtree(BACKUP)


def apply(mutant: Mutant, text: str) -> str | None:
    for old, new in mutant.edits:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new)
    return text


def run(mutant: Mutant, timeout: int) -> str:
    path = ROOT / mutant.file
    original = path.read_text()
    mutated = apply(mutant, original)
    if mutated is None:
        return "stale"
    backup = BACKUP / mutant.file
    backup.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, backup)
    try:
        path.write_text(mutated)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}  # no cached mutant bytecode
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p",
                                     "no:cacheprovider", *mutant.tests], cwd=ROOT, env=env, timeout=timeout,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired:
            return "killed (timeout)"
        if result.returncode == 1:
            return "killed"
        if result.returncode == 0:
            return "SURVIVED"
        return f"error (pytest exit {result.returncode})"  # collection/usage error: not counted as killed
    finally:
        path.write_text(original)
        os.utime(path)
        backup.unlink()
        shutil.rmtree(BACKUP, ignore_errors=True)


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", nargs="*", default=[], help="only defects whose name contains one of these words")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per defect")
    args = parser.parse_args(argv)
    # Ctrl-C and kill both unwind through run()'s finally; SIGINT explicitly, since a shell starts background jobs
    # with SIGINT ignored, and Python would keep ignoring it.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    restore_leftovers()
    chosen = [m for m in MUTANTS if not args.k or any(word.lower() in m.name.lower() for word in args.k)]
    killed = 0
    for mutant in chosen:
        started = time.time()
        outcome = run(mutant, args.timeout)
        killed += outcome.startswith("killed")
        print(f"{outcome:<18} {mutant.name}  [{mutant.file}; {' '.join(mutant.tests)}; {time.time() - started:.0f} s]",
              flush=True)
    print(f"killed {killed}/{len(chosen)}")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: the planted defect was removed, the tree is as before")
