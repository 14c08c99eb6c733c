"""Phi-4-multimodal-instruct (vision path) behind the model seam (phi3v.models.family)."""
