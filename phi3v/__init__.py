"""Fine-tune Phi-3.5-vision (and Phi-3-vision) natively on transformers 5.x.

Public API: `from phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor`. The names are
imported on first use, so light modules (phi3v.data.synthetic, phi3v.common.metrics) do not pull in torch and
transformers. The layout, the import floors and where each kind of change goes: ARCHITECTURE.md.
"""

import importlib
import logging

# bitsandbytes (which transformers and peft import) logs at import, on CPUs with AVX512-BF16, that the optional
# `kernels` package for its CPU 4-bit kernel is missing: noise in every command's output, with nothing to act on.
# Only that message is dropped (importing phi3v before transformers, as the entry points do, comes first); any other
# bitsandbytes message still shows.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))

_EXPORTS = {
    "Phi3VConfig": "phi3v.models.phi3_v.configuration",
    "Phi3VForCausalLM": "phi3v.models.phi3_v.modeling",
    "Phi3VImageProcessor": "phi3v.models.phi3_v.image_processing",
    "num_image_tokens": "phi3v.models.phi3_v.image_processing",
    "Phi3VProcessor": "phi3v.models.phi3_v.processing",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'phi3v' has no attribute {name!r}")
