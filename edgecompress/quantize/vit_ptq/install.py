"""Put the searched quantizers into the model's slots (every one through ``add_to_chain``, so
``restore()`` rebuilds them) and fold AdaLog's post-GELU shift into the Linear's bias."""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.models.slots import add_to_chain
from edgecompress.quantize.log_modules import AdaLogQuantizer, LogQuantizer, TanQuantizer
from edgecompress.quantize.modules import UniformQuantizer, sqnr_db
from edgecompress.quantize.reparam import fold_shift_into_bias_
from edgecompress.quantize.vit_ptq.attn import MatmulParams
from edgecompress.quantize.vit_ptq.objectives import LinearParams


def _uniform(
    bits: int, granularity: str, role: str, scale: torch.Tensor, zp: torch.Tensor, shape
) -> UniformQuantizer:
    q = UniformQuantizer(bits, False, granularity, role)
    return q.set_params(scale.reshape(shape), zp.reshape(shape))


def install_linear(
    model: nn.Module, names: tuple[str, ...], p: LinearParams, w_bits: int, a_bits: int, info: dict
) -> None:
    """Weight quantizers (rows of the concatenated search split back per Linear) and one input
    quantizer per Linear with the shared parameters; the AdaLog shift goes into each bias."""
    start = 0
    for name in names:
        lin = model.get_submodule(name)
        rows = slice(start, start + lin.out_features)
        start += lin.out_features
        w = lin.effective_weight()  # after any earlier mask
        wq = _uniform(w_bits, "channel", "weight", p.w_scale[rows], p.w_zp[rows], (-1, 1))
        wq.stats = {"sqnr_db": round(sqnr_db(w, wq(w)), 2)}
        add_to_chain(model, f"{name}.weight_chain", wq)
        if "q" in p.act:
            aq = AdaLogQuantizer(a_bits, "linear_in", shift=p.act["shift"], fold_shift=lin.bias is not None)
            aq.set_params(p.act["scale"], p.act["q"])
            if lin.bias is not None:
                fold_shift_into_bias_(lin, p.act["shift"], weight=wq(w))
        else:
            aq = _uniform(a_bits, "tensor", "linear_in", p.act["scale"], p.act["zero_point"], ())
        aq.stats = dict(info)
        add_to_chain(model, f"{name}.input_chain", aq)


def _probs_quantizer(kind: str, bits: int, params: dict) -> nn.Module:
    if kind == "adalog":
        return AdaLogQuantizer(bits, "attn_probs").set_params(torch.tensor(1.0), params["param"])
    if kind == "tanq":
        return TanQuantizer(bits, "attn_probs").set_params(torch.tensor(1.0), params["param"])
    if kind in ("log2", "logsqrt2"):
        return LogQuantizer(bits, kind, "attn_probs").set_params(params["param"])
    return _uniform(bits, "tensor", "attn_probs", params["scale"], params["zero_point"], ())


def install_attention(
    model: nn.Module,
    name: str,
    qk: MatmulParams,
    av: MatmulParams,
    kind: str,
    bits: int,
    extra: dict | None = None,
) -> None:
    """Per-head uniform Q, K, V and the softmax quantizer of one AttentionAdapter; ``extra`` joins
    each quantizer's report entry (e.g. the rank that searched it)."""
    head = (1, -1, 1, 1)
    qk_db = round(10 * float(torch.log10(torch.tensor(qk.ref_power / max(qk.mse, 1e-30)))), 2)
    av_db = round(10 * float(torch.log10(torch.tensor(av.ref_power / max(av.mse, 1e-30)))), 2)
    mods = {
        "q": (_uniform(bits, "head", "attn_q", qk.left["scale"], qk.left["zero_point"], head), qk_db),
        "k": (_uniform(bits, "head", "attn_k", qk.right["scale"], qk.right["zero_point"], head), qk_db),
        "v": (_uniform(bits, "head", "attn_v", av.right["scale"], av.right["zero_point"], head), av_db),
        "probs": (_probs_quantizer(kind, bits, av.left), av_db),
    }
    for point, (mod, db) in mods.items():
        pair = qk if point in ("q", "k") else av
        mod.stats = {
            "layer_sqnr_db": db,
            "matmul": "q@k^T" if pair is qk else "A@V",
            "search_rounds": pair.rounds,
            "search_seconds": pair.seconds,
            **(extra or {}),
        }
        add_to_chain(model, f"{name}.{point}", mod)
