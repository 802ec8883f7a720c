"""Data specs → batches that fit a loaded model: ``digits``, ``imagefolder:PATH``, ``text``, ``text:FILE``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgecompress.data.samples import SampleSet
from edgecompress.errors import UserError
from edgecompress.models.loading import LoadedModel

MAX_TOKENS = 128


@dataclass
class Batches:
    """Model-ready batches (tensors for images, dicts of tensors for text) and optional labels."""

    batches: list
    labels: torch.Tensor | None
    spec: str
    count: int


def default_data(loaded: LoadedModel) -> str:
    return "digits" if loaded.kind == "image" else "text"


def model_classes(model) -> int | None:
    """The number of class outputs of an image classifier (timm ``num_classes``, HF ``num_labels``)."""
    n = getattr(model, "num_classes", None)
    if n is None:
        config = getattr(model, "config", None)
        n = getattr(config, "num_labels", None) if config is not None else None
    return int(n) if isinstance(n, int) and n > 0 else None


def _chunks(x, size: int) -> list:
    return [x[i : i + size] for i in range(0, len(x), size)]


def _image_tensors(spec: str, loaded: LoadedModel, split: str, samples: int):
    from edgecompress.data.images import digits_split, fit_images, imagefolder

    cfg = loaded.data_cfg
    if spec == "digits":
        raw, labels = digits_split(split)
        x = fit_images(raw, tuple(cfg["input_size"]), cfg["mean"], cfg["std"])
    else:
        x, labels, classes = imagefolder(
            spec[len("imagefolder:") :],
            tuple(cfg["input_size"]),
            cfg["mean"],
            cfg["std"],
            cfg.get("crop_pct", 0.875),
        )
        outputs = model_classes(loaded.model)
        if outputs is not None and len(classes) > outputs:
            raise UserError(
                f"{spec} has {len(classes)} class folders but the model has {outputs} outputs: "
                "labels are the sorted folder index, so they would not match"
            )
    if samples:
        x, labels = x[:samples], labels[:samples]
    return x, labels


def _tokenizer_and_texts(spec: str, loaded: LoadedModel, split: str, samples: int):
    from transformers import AutoTokenizer

    from edgecompress.data.text import load_texts

    if not loaded.tokenizer_dir:
        raise UserError(f"model {loaded.spec} has no tokenizer files, so text data cannot be fed to it")
    texts = load_texts(spec, split)
    if samples:
        texts = texts[:samples]
    tok = AutoTokenizer.from_pretrained(loaded.tokenizer_dir, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, texts


def _images(spec: str, loaded: LoadedModel, split: str, samples: int, batch_size: int) -> Batches:
    x, labels = _image_tensors(spec, loaded, split, samples)
    return Batches(_chunks(x, batch_size), labels, spec, len(x))


def _text(spec: str, loaded: LoadedModel, split: str, samples: int, batch_size: int) -> Batches:
    tok, texts = _tokenizer_and_texts(spec, loaded, split, samples)
    batches = []
    for chunk in _chunks(texts, batch_size):
        enc = tok(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        batches.append(_check_ids(dict(enc), loaded))
    return Batches(batches, None, spec, len(texts))


def _check_ids(enc: dict, loaded: LoadedModel) -> dict:
    """Refuse token ids the model's embedding cannot look up (a tokenizer that does not match it)."""
    vocab = getattr(getattr(loaded.model, "config", None), "vocab_size", None)
    top = int(enc["input_ids"].max()) if enc["input_ids"].numel() else 0
    if vocab and top >= vocab:
        raise UserError(
            f"the tokenizer of {loaded.spec} gives token id {top}, but the model's vocabulary has {vocab} "
            "entries: tokenizer and model do not match"
        )
    return enc


def _check_spec(spec: str, loaded: LoadedModel, samples: int, batch_size: int) -> bool:
    """Whether ``spec`` is image data; one-line errors for specs that do not fit ``loaded``."""
    is_image_spec = spec == "digits" or spec.startswith("imagefolder:")
    is_text_spec = spec == "text" or spec.startswith("text:")
    if not (is_image_spec or is_text_spec):
        raise UserError(f"unknown data spec {spec!r}: use digits, imagefolder:PATH, text or text:FILE")
    if is_image_spec != (loaded.kind == "image"):
        want = (
            "image data (digits, imagefolder:PATH)"
            if loaded.kind == "image"
            else "text data (text, text:FILE)"
        )
        raise UserError(f"data {spec!r} does not fit {loaded.kind} model {loaded.spec}: it needs {want}")
    if samples < 0 or batch_size <= 0:
        raise UserError("samples must be ≥ 0 and batch_size > 0")
    return is_image_spec


def load_samples(
    spec: str | None, loaded: LoadedModel, split: str, samples: int = 0, batch_size: int = 32
) -> SampleSet:
    """Like :func:`load_data`, as one :class:`~edgecompress.data.samples.SampleSet` (training):
    text padded to the longest text of the split; its batches are trimmed to their own longest."""
    spec = spec or default_data(loaded)
    if _check_spec(spec, loaded, samples, batch_size):
        x, labels = _image_tensors(spec, loaded, split, samples)
        if len(x) == 0:
            raise UserError(f"data {spec!r} is empty")
        return SampleSet(x, labels, batch_size)
    tok, texts = _tokenizer_and_texts(spec, loaded, split, samples)
    if not texts:
        raise UserError(f"data {spec!r} is empty")
    enc = tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return SampleSet(_check_ids(dict(enc), loaded), None, batch_size)


def load_data(
    spec: str | None, loaded: LoadedModel, split: str, samples: int = 0, batch_size: int = 32
) -> Batches:
    """Load ``spec`` (default: digits for image models, built-in text otherwise) for ``loaded``."""
    spec = spec or default_data(loaded)
    is_image_spec = _check_spec(spec, loaded, samples, batch_size)
    out = (_images if is_image_spec else _text)(spec, loaded, split, samples, batch_size)
    if out.count == 0:
        raise UserError(f"data {spec!r} is empty")
    return out
