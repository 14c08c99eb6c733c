"""Phi-3-vision-128k and Phi-3.5-vision: CLIP ViT-L/14-336 + Phi-3-mini, natively on transformers 5.x."""
