"""Embedding tables with a weight slot: :class:`SlotEmbedding` (the embedding counterpart of
:class:`~edgecompress.models.slots.SlotLinear`) and the selection of the tables a pass may quantize."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.models.slots import NOT_CALLED, QUANTIZER, Chain, _saved_buffer_bytes, called
from edgecompress.models.targeting import select_modules
from edgecompress.quantize.uniform import sqnr_db
from edgecompress.structure import register_swap, replace_module

_PLAIN_EMBEDDING_NAMES = {"torch.nn.modules.sparse.Embedding"}


def embedding_swappable(mod: nn.Module) -> str | None:
    """Why ``mod`` cannot become a :class:`SlotEmbedding` (None when it can)."""
    if isinstance(mod, SlotEmbedding):
        return None
    cls = type(mod)
    if f"{cls.__module__}.{cls.__qualname__}" not in _PLAIN_EMBEDDING_NAMES:
        return f"{cls.__name__} is not a plain Embedding (custom forward)"
    if mod.max_norm is not None or mod.sparse or mod.scale_grad_by_freq:
        return "max_norm / sparse / scale_grad_by_freq embeddings are left in float"
    return None


@register_swap
class SlotEmbedding(nn.Embedding):
    """``F.embedding(ids, weight_chain(W))``: an ``nn.Embedding`` with a weight slot.

    A weight chain of exactly one per-row quantizer (granularity ``channel``: one scale per
    vocabulary row) is applied to the looked-up rows only — the same values as quantizing the
    whole table, without fake-quantizing 30k rows per call. The table is stored as integer codes
    (:func:`~edgecompress.quantize.uniform.pack_codes`) plus the per-row scales and zero-points.
    """

    VERSION: ClassVar[int] = 1

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, device=None, dtype=None):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.weight_chain = Chain("embedding_weight")

    @classmethod
    def adopt(cls, emb: nn.Embedding) -> SlotEmbedding:
        new = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
        new.weight = emb.weight
        new.train(emb.training)
        return new

    def _row_quantizer(self) -> nn.Module | None:
        chain = list(self.weight_chain)
        if len(chain) == 1 and getattr(chain[0], "granularity", None) == "channel":
            return chain[0]
        return None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self._row_quantizer()
        if q is None:
            return F.embedding(ids, self.weight_chain(self.weight), self.padding_idx)
        return q.rows(F.embedding(ids, self.weight, self.padding_idx), ids)

    def effective_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.weight_chain(self.weight).detach()

    def swap_config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx}

    @classmethod
    def from_swap(cls, original, config: dict) -> SlotEmbedding:
        if isinstance(original, nn.Embedding) and not isinstance(original, SlotEmbedding):
            return cls.adopt(original)
        return cls(**config)

    def _codec(self) -> nn.Module | None:
        chain = list(self.weight_chain)
        return chain[0] if len(chain) == 1 and callable(getattr(chain[0], "encode_weight", None)) else None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The table as integer codes where they restore it bit-identically (see SlotLinear)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        q = self._codec()
        if q is None:
            return
        w = destination[prefix + "weight"].detach()
        codes = q.encode_weight(w)
        if codes is None:
            return
        back = q.decode_weight(codes, q.scale, q.zero_point, w.shape).to(w.dtype)
        with torch.no_grad():
            if torch.equal(q(back), q(w)):
                del destination[prefix + "weight"]
                destination[prefix + "weight_codes"] = codes
                destination[prefix + "weight_sqnr_db"] = torch.tensor(sqnr_db(w, q(w)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        q = self._codec()
        if q is not None and prefix + "weight_codes" in state_dict:
            scale = state_dict[f"{prefix}weight_chain.0.scale"]
            zero_point = state_dict[f"{prefix}weight_chain.0.zero_point"]
            shape = (self.num_embeddings, self.embedding_dim)
            values = q.decode_weight(state_dict.pop(prefix + "weight_codes"), scale, zero_point, shape)
            state_dict[prefix + "weight"] = values.to(self.weight.dtype)
            self.saved_sqnr_db = float(state_dict.pop(prefix + "weight_sqnr_db", torch.tensor(float("nan"))))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_quantizer(self) -> nn.Module | None:
        return self.weight_chain.find(QUANTIZER)

    def deployed_bytes(self) -> int:
        bits = getattr(self.weight_quantizer(), "bits", self.weight.element_size() * 8)
        return self.weight.numel() * bits // 8 + _saved_buffer_bytes(self.weight_chain)

    def describe(self) -> dict:
        wq = self.weight_quantizer()
        row = {
            "layer": "SlotEmbedding",
            "shape": [self.num_embeddings, self.embedding_dim],
            "w_bits": getattr(wq, "bits", None),
            "a_bits": None,
            "bytes": self.deployed_bytes(),
        }
        if getattr(self, "saved_sqnr_db", None) is not None:
            row["weight_sqnr_db"] = round(self.saved_sqnr_db, 2)
        elif wq is not None:
            with torch.no_grad():
                row["weight_sqnr_db"] = round(sqnr_db(self.weight, wq(self.weight)), 2)
        return row


def tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id → the names of the modules that hold it as ``weight`` (tied embeddings)."""
    out: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None:
            out.setdefault(id(w), []).append(n)
    return out


def slot_embeddings(model: nn.Module, targets, ignore, run=None) -> tuple[list[str], list[tuple[str, str]]]:
    """Every targeted ``nn.Embedding`` as a SlotEmbedding: (names, [(name, why skipped)]). Skipped:
    embeddings never called, with a custom forward, or whose table is tied to another module's
    weight (a language model's output head): quantizing one would silently untie them."""
    embs = [(n, m) for n, m in select_modules(model, targets, ignore) if isinstance(m, nn.Embedding)]
    ran = called(model, [n for n, _ in embs], run) if run is not None else {n for n, _ in embs}
    tied = tied_weights(model)
    names, skipped = [], []
    for name, mod in embs:
        sharing = [n for n in tied.get(id(mod.weight), []) if n != name]
        why = (
            NOT_CALLED if name not in ran
            else f"weight tied to {sharing[0]}" if sharing
            else embedding_swappable(mod)
        )  # fmt: skip
        if why:
            skipped.append((name, why))
            continue
        if not isinstance(mod, SlotEmbedding):
            replace_module(model, name, SlotEmbedding.adopt(mod))
        names.append(name)
    return names, skipped
