"""The real Phi-3 vocabulary (tests/assets/phi3-vocab, see its PROVENANCE.md): the original tokenizer's test
vectors, and the processor, chat template, label masking, decoding and the metric pipeline with the real ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from phi3v.common.metrics import accuracy, anls
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.dataset import ConversationDataset
from tests.conftest import make_image

pytest.importorskip("gguf", reason="the real vocabulary is read from its GGUF file (requirements-dev.txt)")

VOCAB = Path(__file__).resolve().parent / "assets" / "phi3-vocab"
NEWLINE = [29871, 13]  # "▁" "\n": the real tokenizer's newline after a special token or at a chunk start
USER, ASSISTANT, END, ENDOFTEXT = 32010, 32001, 32007, 32000


@pytest.fixture(scope="module")
def real_dir(real_vocab_dir):
    return real_vocab_dir


@pytest.fixture(scope="module")
def real(real_dir):
    """The processor as saved into and loaded back from the checkpoint directory (tokenizer.json + config)."""
    from phi3v import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(real_dir)


def test_the_original_tokenizers_test_vectors(real):
    """llama.cpp's vectors: each string, and the ids the original Hugging Face Phi-3 tokenizer gives (no BOS)."""
    texts = (VOCAB / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (VOCAB / "ggml-vocab-phi-3.gguf.out").read_text().split("\n")
    assert len(texts) == len(expected) == 47
    for text, ids in zip(texts, expected):
        assert real.tokenizer(text, add_special_tokens=False)["input_ids"] == [int(i) for i in ids.split()], text


def test_special_tokens_at_the_official_ids(real):
    tokenizer = real.tokenizer
    assert len(tokenizer) == 32064  # the GGUF pads the 32,011 entries with [PAD32011].. up to the embedding size
    assert tokenizer.convert_ids_to_tokens(29871) == "▁" and tokenizer.convert_ids_to_tokens(13) == "<0x0A>"
    assert [tokenizer.convert_tokens_to_ids(t) for t in ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>",
                                                          "<|system|>", "<|end|>", "<|user|>"]] == \
        [0, 1, 2, 32000, 32001, 32006, 32007, 32010]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, ENDOFTEXT, ENDOFTEXT)
    assert real.end_token_ids() == [END, ENDOFTEXT]


def test_chat_prompt_ids(real):
    """The ids PROVENANCE.md records for the original tokenizer, through our chat template."""
    prompt = real.apply_chat_template([{"role": "user", "content": "What is shown?"}], add_generation_prompt=True)
    assert prompt == "<|user|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    assert real(prompt)["input_ids"][0].tolist() == [1, USER, *NEWLINE, 5618, 338, 4318, 29973, END, *NEWLINE,
                                                     ASSISTANT, *NEWLINE]


def test_processor_with_an_image(real):
    """Each chunk gets its own BOS; the chunk after the image starts with "\\n", so "▁" "\\n" again."""
    out = real("<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n", [make_image(640, 480)])
    assert out["input_ids"][0].tolist() == [1, USER, *NEWLINE] + [-1] * 757 + [
        1, *NEWLINE, 5618, 338, 4318, 29973, END, *NEWLINE, ASSISTANT, *NEWLINE]
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)


def supervised(example) -> list[int]:
    return [int(t) for t in example["labels"] if t != -100]


def test_label_masking(real):
    """Supervised: exactly the answer, <|end|>, its newline and the final <|endoftext|> of each turn, as the original
    recipe's target `answer<|end|>\\n<|endoftext|>`; the prompt, images, BOS and <|assistant|>\\n never."""
    conversation = Conversation("a", [Turn("Which class?", "Archery", [make_image(100, 100)]),
                                      Turn("Sure?", "Yes, Archery.")])
    example = ConversationDataset([conversation], lambda c: c, real)[0]
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    answer_1 = real.tokenizer("Archery", add_special_tokens=False)["input_ids"]
    answer_2 = real.tokenizer("Yes, Archery.", add_special_tokens=False)["input_ids"]
    # after "\n" the first piece of an answer has no "▁": "Archery" -> "Ar" "chery", not "▁Arch" "ery"
    first_1 = real.tokenizer("\nArchery", add_special_tokens=False)["input_ids"][len(NEWLINE):]
    first_2 = real.tokenizer("\nYes, Archery.", add_special_tokens=False)["input_ids"][len(NEWLINE):]
    assert supervised(example) == [*first_1, END, *NEWLINE, *first_2, END, *NEWLINE, ENDOFTEXT]
    assert real.decode(first_1) == "Archery" and real.decode(first_2) == "Yes, Archery."
    assert len(first_1) >= 1 and len(answer_1) >= 1 and len(answer_2) >= 1
    assert ids[-1] == ENDOFTEXT and labels[-1] == ENDOFTEXT
    for position, (token, label) in enumerate(zip(ids, labels)):
        if token < 0 or token in (1, USER, ASSISTANT):
            assert label == -100, position
    start = ids.index(ASSISTANT)
    assert labels[start:start + 3] == [-100] * 3  # <|assistant|> "▁" "\n"
    assert ids[start + 3:start + 3 + len(first_1)] == first_1 == labels[start + 3:start + 3 + len(first_1)]


def test_decoded_predictions_score_as_the_references(real):
    """What generation decodes (new ids after the prompt, up to and including the stop token, special tokens
    skipped) gives back the reference text, so a model that learnt the labels scores 1.0 on accuracy and ANLS."""
    references = ["Archery", "yes", "$1,234.56", "12 March 2024", "Ödön Lechner", "BabyCrawling"]
    conversations = [Conversation(str(i), [Turn("Q?", answer)]) for i, answer in enumerate(references)]
    dataset = ConversationDataset(conversations, lambda c: c, real)
    generated = []
    for i in range(len(references)):
        labels = dataset[i]["labels"]
        answer = [int(t) for t in labels if t != -100]
        generated.append(answer[: answer.index(END) + 1])  # the model stops at <|end|> (included in the output)
    batch = torch.full((len(generated), max(map(len, generated))), ENDOFTEXT)  # padded after the stop token
    for row, ids in enumerate(generated):
        batch[row, : len(ids)] = torch.tensor(ids)
    predictions = real.batch_decode(batch, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert predictions == references
    assert accuracy(predictions, references) == 1.0
    assert anls(predictions, [[r] for r in references]) == 1.0
    assert anls(predictions, [[r.upper()] for r in references]) == 1.0  # standard ANLS ignores case
    assert anls(predictions, [[r.upper()] for r in references], case_sensitive=True) < 1.0


def test_saved_files_keep_the_flags(real_dir, real):
    assert real.tokenizer("a b")["input_ids"] == [1, 263, 289]  # BOS added, no EOS, after a save and a load
    import json

    config = json.loads((real_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{% for message in messages %}")
    assert config["tokenizer_class"] == "LlamaTokenizer"
