"""FSDP2 (torch's fully_shard) on CPU with gloo, run by tests/test_gpu_paths.py under torchrun --nproc_per_node=2.

accelerate (and so the Trainer's --fsdp) does not shard on CPU: AcceleratorState only turns FSDP on for GPU-like
distributed types and otherwise runs DDP (accelerate/state.py, AcceleratorState.__init__). torch itself shards on
CPU, so the parts that can run are run here with torch directly: the wrapping policy of ds_configs/fsdp_config.json,
a training step, generation with synced_gpus where ranks need different numbers of steps, evaluation by
phi3v.generation, and the full state dict in the official layout.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp2_cpu.py TINY_DIR DATA_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from phi3v import Phi3VForCausalLM, Phi3VProcessor  # noqa: E402
from phi3v.data.jsonl import jsonl_dataset  # noqa: E402
from phi3v.eval.generation import generate_predictions  # noqa: E402


def main(tiny_dir: str, data_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "fsdp_config.json").read_text())
    model = Phi3VForCausalLM.from_pretrained(tiny_dir)
    layers = [m for m in model.modules() if type(m).__name__ in config["transformer_layer_cls_to_wrap"]]
    wrapped = sorted(type(m).__name__ for m in layers)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)

    ids = torch.randint(3, 900, (1, 10 + 5 * rank), generator=torch.Generator().manual_seed(rank))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    model.eval()
    steps = 3 + 4 * rank  # rank 1 needs more forward passes than rank 0: without synced_gpus rank 1 would hang
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                   min_new_tokens=steps, do_sample=False, synced_gpus=True, pad_token_id=32000)
    processor = Phi3VProcessor.from_pretrained(tiny_dir)
    dataset = jsonl_dataset(Path(data_dir) / "ucf101_val.jsonl", Path(data_dir) / "images", processor,
                            for_generation=True)
    predictions = generate_predictions(model, dataset, batch_size=1, max_new_tokens=4, synced_gpus=True,
                                       disable_tqdm=True)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    lengths = [None] * dist.get_world_size()
    dist.all_gather_object(lengths, generated.shape[1] - ids.shape[1])
    if rank == 0:
        official = load_file(Path(tiny_dir) / "model.safetensors")
        Path(out).write_text(json.dumps({
            "wrapped": wrapped,
            "sharded": type(model.lm_head.weight).__name__,
            "loss": float(loss.detach()),
            "generated_steps": lengths,
            "predictions": len(predictions),
            "state_dict_keys_match": set(state) == set(official),
            "state_dict_values_match": all(torch.equal(state[k], official[k]) for k in official),
        }))
    dist.barrier()  # rank 1 left while rank 0 still wrote: its gloo threads aborted it ("terminate called")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
