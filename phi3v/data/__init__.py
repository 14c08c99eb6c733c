"""Data: conversations from every supported source, rendered, validated and batched for a model family's processor.

Modules, bottom up: images and video (references opened as the model sees them), conversation (Turn, Conversation,
rendering through the chat template, labels), dataset (ConversationDataset), jsonl / hub_datasets / formats (the
sources: our jsonl, LLaVA, messages, Hugging Face datasets), collator, validation (+ its cache), convert, ucf101
(videos -> frames + jsonl), synthetic (the demo's videos).
"""
