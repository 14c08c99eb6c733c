"""Data: conversations from every supported source, rendered, validated and batched for a model family's processor.

Bottom up: images and video, conversation (rendering, labels), dataset, the sources (jsonl, hub_datasets, formats),
validation (+ its cache), convert, ucf101, synthetic.
"""
