"""Our export read by transformers 4.45.2 (the generation vLLM servers pin), in its own venv under .venv-compat/.

What runs under 4.45.2 here: AutoTokenizer on our tokenizer files (ids compared with ours), AutoConfig and
AutoProcessor through auto_map with trust_remote_code, importing the remote-code modules copied into the export,
GenerationConfig, and the shard index. The official *.py files cannot be part of this repository, so the export's
remote code is a stand-in with the official module and class names (tests/test_serving.py): the model's forward
under the official code, and the official processor's image math, are checked only at the file level (auto_map,
tensor names and shapes, preprocessor_config.json values).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v import Phi3VForCausalLM, Phi3VProcessor
from phi3v.serve.export import main as export_main
from tests.test_serving import base_with_code, make_adapter, serving_snippet

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-compat"
PINS = ["torch==2.13.0", "transformers==4.45.2"]
INDEX = "model.safetensors.index.json"
TEXTS = ["<|user|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n", "Answers: (yes) (no) 2024",
         "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nBasketball<|end|>\n<|endoftext|>"]

CHECK = r'''
import json, shutil, sys
import transformers
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig
from transformers.utils.hub import get_checkpoint_shard_files

with_code, without_code, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"version": transformers.__version__}
tokenizer = AutoTokenizer.from_pretrained(with_code)
out["tokenizer"] = {"class": type(tokenizer).__name__, "ids": [tokenizer(t).input_ids for t in texts],
                    "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                    "additional": tokenizer.additional_special_tokens,
                    "chat": tokenizer.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat?"}],
                                                          tokenize=False, add_generation_prompt=True)}
config = AutoConfig.from_pretrained(with_code, trust_remote_code=True)
out["config"] = {"class": type(config).__module__ + "." + type(config).__name__, "model_type": config.model_type,
                 "hidden_size": config.hidden_size, "rope": config.rope_scaling["type"], "auto_map": config.auto_map}
processor = AutoProcessor.from_pretrained(with_code, trust_remote_code=True)
out["processor"] = {"class": type(processor).__module__ + "." + type(processor).__name__,
                    "image_processor": type(processor.image_processor).__name__,
                    "num_crops": processor.image_processor.num_crops, "tokenizer": type(processor.tokenizer).__name__}
out["generation_eos"] = GenerationConfig.from_pretrained(with_code).eos_token_id
index = f"{with_code}/model.safetensors.index.json"
if __import__("os").path.exists(index):
    files, metadata = get_checkpoint_shard_files(with_code, index)
    out["shards"] = {"files": [f.split("/")[-1] for f in files], "names": sorted(metadata["weight_map"])}
# the old processor_config.json (no auto_map): 4.x silently falls back to the tokenizer; ours must not
shutil.copytree(with_code, with_code + "-old")
open(with_code + "-old/processor_config.json", "w").write('{"processor_class": "Phi3VProcessor"}')
out["old_processor_config"] = type(AutoProcessor.from_pretrained(with_code + "-old", trust_remote_code=True)).__name__
snippet = json.loads(sys.argv[4])  # the README's 4.x snippet, less its model line (the modeling code is a stand-in)
exec(snippet.replace('"output/merged"', repr(with_code)), scope := {})
out["readme_processor"] = [type(scope["processor"]).__name__, scope["processor"].image_processor.num_crops]
try:  # no *.py files: auto_map names the official hub repo, which 4.x then asks for the module (offline here)
    AutoConfig.from_pretrained(without_code, trust_remote_code=True)
    out["without_code"] = "loaded"
except Exception as error:
    out["without_code"] = str(error)
print("RESULT " + json.dumps(out))
'''


def compat_python() -> Path:
    """The .venv-compat interpreter with the pinned transformers 4.x, built on first use (about 2 minutes)."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import transformers; print(transformers.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "4.45.2":
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PINS], check=True, timeout=1200)
    return python


def test_export_loads_with_transformers_4(tiny_dir, tmp_path):
    python = compat_python()
    base = base_with_code(tiny_dir, tmp_path / "base")
    adapter = make_adapter(tiny_dir, tmp_path / "adapter")
    with_code = export_main([str(adapter), str(tmp_path / "with-code"), "--base", str(base), "--dtype", "float32"])
    Phi3VForCausalLM.from_pretrained(with_code).save_pretrained(tmp_path / "resharded", max_shard_size="5MB")
    (with_code / "model.safetensors").unlink()  # the same weights in small shards, to read the index with 4.x
    for shard in [*(tmp_path / "resharded").glob("model-*.safetensors"), tmp_path / "resharded" / INDEX]:
        shutil.move(shard, with_code / shard.name)
    without_code = export_main([str(adapter), str(tmp_path / "without-code"), "--dtype", "float32"])
    snippet = serving_snippet("trust_remote_code=True")
    model_line = snippet[snippet.index("model = "):snippet.index("processor = ")]
    assert "AutoModelForCausalLM.from_pretrained" in model_line
    done = subprocess.run([str(python), "-c", CHECK, str(with_code), str(without_code), json.dumps(TEXTS),
                           json.dumps(snippet.replace(model_line, ""))],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["version"] == "4.45.2"

    ours = Phi3VProcessor.from_pretrained(with_code).tokenizer
    tokenizer = result["tokenizer"]
    assert tokenizer["class"] == "LlamaTokenizerFast"
    assert tokenizer["ids"] == [ours(t).input_ids for t in TEXTS]  # 4.x tokenizes exactly as we do
    assert (tokenizer["bos"], tokenizer["eos"], tokenizer["pad"]) == (1, 32000, 32000)
    assert tokenizer["additional"] == ["<|system|>", "<|end|>", "<|user|>"]
    assert tokenizer["chat"] == "<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n"

    assert result["config"] == {"class": "transformers_modules.with-code.configuration_phi3_v.Phi3VConfig",
                                "model_type": "phi3_v", "hidden_size": 64, "rope": "su",
                                "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                                             "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}}
    assert result["processor"] == {"class": "transformers_modules.with-code.processing_phi3_v.Phi3VProcessor",
                                   "image_processor": "Phi3VImageProcessor", "num_crops": 4,
                                   "tokenizer": "LlamaTokenizerFast"}
    assert result["old_processor_config"] == "LlamaTokenizerFast"  # the failure this layout fixes
    assert result["generation_eos"] == [2, 32000, 32007]
    index = json.loads((with_code / INDEX).read_text())
    assert result["shards"]["files"] == sorted(set(index["weight_map"].values()))
    assert result["shards"]["names"] == sorted(index["weight_map"])
    assert result["readme_processor"] == ["Phi3VProcessor", 4]
    assert "microsoft/Phi-3.5-vision-instruct" in result["without_code"]  # resolved to the official repo's code
