"""Fine-tune Phi-3.5-vision natively on transformers 5.x. The public API: the model, its config and processors."""

from phi3v.image_processing import Phi3VImageProcessor, num_image_tokens
from phi3v.modeling import Phi3VConfig, Phi3VForCausalLM
from phi3v.processing import Phi3VProcessor

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VProcessor", "num_image_tokens"]
