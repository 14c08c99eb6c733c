"""Fine-tune Phi-3.5-vision (and Phi-3-vision) natively on transformers 5.x.

Public API: `from phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor`, imported on first
use so that light modules do not pull in torch and transformers. The layout: ARCHITECTURE.md.
"""

import importlib
import logging

# bitsandbytes logs at import, on CPUs with AVX512-BF16, that an optional package is missing: noise with nothing to
# act on, dropped (only that message).
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
