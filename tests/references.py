"""Independent references, written from each model's card (not from the code under test), shared by the unit
tests and the served tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer


def close(a, b, atol: float = 1e-5) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0)


# -- text embedding ------------------------------------------------------------------------------

END = "<|endoftext|>"


def qwen3_embedding_reference(model_dir: Path, texts, instruction=None) -> torch.Tensor:
    """The model card's code: left padding, last position, L2 normalize."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if instruction:
        texts = [f"Instruct: {instruction}\nQuery:{text}" for text in texts]
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=8192, return_tensors="pt")
    assert (batch["input_ids"][:, -1] == tokenizer.convert_tokens_to_ids(END)).all()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return F.normalize(hidden[:, -1], p=2, dim=1)


def bge_reference(model_dir: Path, texts, instruction: str = "") -> torch.Tensor:
    """BGE's model card: CLS token of the last hidden state, normalized; the instruction in front of queries."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    batch = tokenizer(
        [instruction + text for text in texts], padding=True, truncation=True, max_length=512, return_tensors="pt"
    )
    with torch.no_grad():
        return F.normalize(model(**batch)[0][:, 0], p=2, dim=1)


# -- reranking (Qwen3-Reranker's card) ----------------------------------------------------------

# Copied from the model card (not imported from the code under test).
CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_TASK = "Given a web search query, retrieve relevant passages that answer the query"

QUERY = "an orange cat"
DOCUMENTS = [
    "an orange cat sleeps in the sun",
    "a black dog runs on the grass " * 6,
    "yes",
    "一只橙色的猫在阳光下晒太阳",
    "the cat sat on the mat. " * 3,
    "",
]


def card_format(instruction: str | None, query: str, document: str) -> str:
    if instruction is None:
        instruction = CARD_TASK
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def card_inputs(tokenizer, query: str, documents: list[str], instruction: str | None, max_length: int) -> dict:
    """The model card's process_inputs: truncate the body only, wrap, pad on the left."""
    prefix = tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
    pairs = [card_format(instruction, query, document) for document in documents]
    inputs = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix) - len(suffix),
    )
    for i, ids in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix + ids + suffix
    return tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)


def card_scores(model_dir: Path, tokenizer_dir: Path, query, documents, instruction=None, max_length=8192):
    """Full forward, full-vocabulary logits at the last position, log-softmax over (no, yes), exp of yes."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), padding_side="left")
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    inputs = card_inputs(tokenizer, query, documents, instruction, max_length)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # some rows really are left-padded
    with torch.no_grad():
        if (model_dir / "config.json").read_text().count("ForCausalLM"):
            logits = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()(**inputs).logits[:, -1, :]
        else:  # Z-Image's text encoder: a bare Qwen3Model whose output projection is its tied input embeddings
            model = AutoModel.from_pretrained(str(model_dir)).eval()
            hidden = model(**inputs).last_hidden_state[:, -1, :]
            logits = hidden @ model.get_input_embeddings().weight.T
    pair = torch.stack([logits[:, no], logits[:, yes]], dim=1)
    return torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp()


# -- SigLIP2 ------------------------------------------------------------------------------------

SIGLIP_TEXTS = ["an orange cat sleeps in the sun", "A Black DOG runs on the GRASS", "a photo of two cats", "red"]


def as_features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def card_model(model_dir: Path):
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(str(model_dir))


def reference_images(model_dir: Path, images: list[Image.Image]) -> torch.Tensor:
    model, processor = card_model(model_dir)
    batch = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(as_features(model.get_image_features(**batch)), dim=-1)


def reference_texts(model_dir: Path, texts: list[str], lower: bool = True, **tokenizer_options) -> torch.Tensor:
    """Lower-cased, padding="max_length", max_length=64, as the SigLIP2 model card says."""
    model, processor = card_model(model_dir)
    texts = [text.lower() for text in texts] if lower else list(texts)
    batch = processor(text=texts, padding="max_length", max_length=64, return_tensors="pt", **tokenizer_options)
    with torch.no_grad():
        return F.normalize(as_features(model.get_text_features(**batch)), dim=-1)


def check_ranking_against_card(results: list[dict], expected: torch.Tensor, atol: float = 1e-4) -> None:
    """A `/rerank` answer's results against the card's scores for DOCUMENTS: every document, best first, each
    score within `atol`, each document echoed."""
    assert [r["original_index"] for r in results] == sorted(range(len(expected)), key=lambda i: -expected[i].item())
    for result in results:
        assert abs(result["score"] - expected[result["original_index"]].item()) < atol
        assert result["document"] == DOCUMENTS[result["original_index"]]
