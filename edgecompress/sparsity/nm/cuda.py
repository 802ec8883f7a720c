"""2:4 Linears on a CUDA GPU through PyTorch's semi-structured sparse tensors (cuSPARSELt / CUTLASS).

:func:`accelerate_2to4` gives every SlotLinear whose weight chain is exactly one frozen 2:4
:class:`~edgecompress.sparsity.nm.modules.NMMask` a ``torch.sparse.to_sparse_semi_structured``
copy of its masked weight; in eval mode the mask then returns that tensor and ``F.linear``
dispatches to the sparse kernel. A layer keeps the dense path where the conversion refuses the
shape or dtype, or, with ``probe=True``, where the sparse product is not faster than the dense one
on a ``[tokens, in]`` input (CUDA events, median of 20). Half precision only (fp16 / bf16), as the
kernels require. Unverified here: no GPU has run it yet (the ``gpu``-marked test does).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.models.slots import SlotLinear
from edgecompress.sparsity.nm.modules import NMMask


def _eligible(layer: nn.Module) -> NMMask | None:
    if not isinstance(layer, SlotLinear) or len(layer.weight_chain) != 1:
        return None
    el = layer.weight_chain[0]
    ok = isinstance(el, NMMask) and (el.n, el.m) == (2, 4) and el.mode == "fixed"
    return (
        el if ok and layer.weight.is_cuda and layer.weight.dtype in (torch.float16, torch.bfloat16) else None
    )


def _median_ms(fn, reps: int = 20) -> float:
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def accelerate_2to4(model: nn.Module, tokens: int = 4096, probe: bool = True) -> dict[str, str]:
    """Switch eligible 2:4 layers to semi-structured sparse weights; returns ``{layer: what happened}``."""
    from torch.sparse import to_sparse_semi_structured

    report = {}
    for name, layer in model.named_modules():
        el = _eligible(layer)
        if el is None:
            continue
        w = (layer.weight.detach() * el.mask.to(layer.weight)).contiguous()
        try:
            sparse = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            report[name] = f"dense ({str(e).splitlines()[0][:120]})"
            continue
        if probe:
            x = torch.randn(tokens, layer.in_features, device=w.device, dtype=w.dtype)
            dense_ms = _median_ms(lambda x=x, w=w: F.linear(x, w))
            sparse_ms = _median_ms(lambda x=x, s=sparse: F.linear(x, s))
            if sparse_ms >= dense_ms:
                report[name] = f"dense (sparse {sparse_ms:.3f} ms ≥ dense {dense_ms:.3f} ms)"
                continue
            report[name] = f"sparse ({sparse_ms:.3f} ms vs dense {dense_ms:.3f} ms)"
        else:
            report[name] = "sparse (not probed)"
        el.semi_structured = sparse
    return report
