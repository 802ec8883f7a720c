"""Where the MLPs are, found from the module structure (no tracing, no forks).

* timm ``Mlp`` (``fc1 → act → fc2``, ViT / DeiT / Swin / BEiT …), ``SwiGLU`` (``act(fc1_g x) ⊙
  fc1_x x → fc2``) and ``GluMlp`` (EVA02: gate and up fused in ``fc1``, chunked: hidden unit ``j``
  is rows ``j`` and ``H + j`` of ``fc1``); one with a norm over its hidden units (``scale_mlp``) is
  marked (``norm``, ``why``), since the norm couples the units;
* HF encoder layers (BERT, RoBERTa …): ``intermediate`` (``dense`` + ``intermediate_act_fn``)
  and the sibling ``output.dense`` (the output module's dropout, residual and LayerNorm follow it);
  HF ``fc1 → activation_fn → fc2`` MLPs (ViT in transformers 5, CLIP);
* HF gated MLPs (Llama, Mistral, Qwen2: ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``).

Used by the ACM pass (which replaces the whole MLP) and by structured pruning (which removes hidden
units): a :class:`Site` names the modules that hold the hidden units, by path, besides the Linears.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Site:
    name: str  # the MLP module (its input is the MLP's input)
    out: str  # the module whose output is the MLP's output (== name, or HF's ``output.dense``)
    fc1: nn.Linear  # the gate (or only) input projection; for GluMlp a copy of fc1's gate half
    fc2: nn.Linear
    act: str | None  # None: an activation we cannot name
    up: nn.Linear | None = None  # the up projection of a gated MLP; for GluMlp a copy of fc1's up half
    passthrough: str | None = None  # HF: ``output.dense`` (the MLP's second Linear lives outside it)
    why: str | None = None  # why the site is left alone by passes that split its hidden units
    fc1_name: str = ""  # paths of the Linears holding the hidden units (rows of fc1/up, columns of fc2)
    fc2_name: str = ""
    up_name: str | None = None
    fused: bool = False  # fc1 holds gate and up (GluMlp): hidden unit j is rows j and H + j of fc1
    norm: str | None = None  # a norm over the hidden units (timm scale_mlp), if any


def act_name(mod) -> str | None:
    """Our name for an activation module / function, or None when unsupported."""
    name = type(mod).__name__.lower()
    if isinstance(mod, nn.GELU):
        return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
    if isinstance(mod, nn.SiLU) or name in ("siluactivation",):
        return "silu"
    if isinstance(mod, nn.ReLU):
        return "relu"
    if name in ("geluactivation",):
        return "gelu"
    if name in ("newgeluactivation", "gelutanh", "pytorchgelutanh", "fastgeluactivation"):
        return "gelu_tanh"
    if name in ("quickgeluactivation", "quickgelu"):
        return "quick_gelu"
    fn = getattr(mod, "__name__", "")
    return {"gelu": "gelu", "silu": "silu", "relu": "relu"}.get(fn)


def _plain_linear(*mods) -> bool:
    return all(isinstance(m, nn.Linear) for m in mods)


def _half(lin: nn.Linear, part: int) -> nn.Linear:
    """Rows ``part`` (0: first half, 1: second) of a fused Linear, as its own Linear (a copy)."""
    n = lin.out_features // 2
    rows = slice(part * n, (part + 1) * n)
    out = nn.Linear(lin.in_features, n, bias=lin.bias is not None).to(lin.weight.device, lin.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            out.bias.copy_(lin.bias[rows])
    return out


def _timm_site(name: str, mod: nn.Module) -> Site | None:
    fc1, fc2, act = getattr(mod, "fc1", None), getattr(mod, "fc2", None), getattr(mod, "act", None)
    paths = {"fc1_name": f"{name}.fc1", "fc2_name": f"{name}.fc2"}
    if _plain_linear(fc1, fc2) and act is not None:
        glu = fc1.out_features == 2 * fc2.in_features and getattr(mod, "chunk_dim", -1) == -1
        if glu:  # GluMlp (EVA02): fc1 holds gate and up, chunked along the features
            gate, up = (1, 0) if getattr(mod, "gate_last", False) else (0, 1)
            return Site(
                name, name, _half(fc1, gate), fc2, act_name(act), up=_half(fc1, up), fused=True, **paths
            )
        if fc1.out_features == fc2.in_features:
            return Site(name, name, fc1, fc2, act_name(act), **paths)  # timm Mlp
    if _plain_linear(*(getattr(mod, a, None) for a in ("fc1_g", "fc1_x", "fc2"))) and act is not None:
        return Site(  # timm SwiGLU
            name, name, mod.fc1_g, mod.fc2, act_name(act), up=mod.fc1_x,
            fc1_name=f"{name}.fc1_g", fc2_name=f"{name}.fc2", up_name=f"{name}.fc1_x",
        )  # fmt: skip
    return None


def _hf_site(name: str, mod: nn.Module, root: nn.Module) -> Site | None:
    fc1, fc2, act = (getattr(mod, a, None) for a in ("fc1", "fc2", "activation_fn"))
    if _plain_linear(fc1, fc2) and act is not None and fc1.out_features == fc2.in_features:  # HF ViT, CLIP
        return Site(name, name, fc1, fc2, act_name(act), fc1_name=f"{name}.fc1", fc2_name=f"{name}.fc2")
    if _plain_linear(*(getattr(mod, a, None) for a in ("gate_proj", "up_proj", "down_proj"))):
        return Site(
            name, name, mod.gate_proj, mod.down_proj, act_name(getattr(mod, "act_fn", None)), mod.up_proj,
            fc1_name=f"{name}.gate_proj", fc2_name=f"{name}.down_proj", up_name=f"{name}.up_proj",
        )  # fmt: skip
    dense, act = getattr(mod, "dense", None), getattr(mod, "intermediate_act_fn", None)
    parent_name, _, leaf = name.rpartition(".")
    if leaf == "intermediate" and isinstance(dense, nn.Linear) and act is not None:
        parent = root.get_submodule(parent_name) if parent_name else root
        out_dense = getattr(getattr(parent, "output", None), "dense", None)
        if isinstance(out_dense, nn.Linear) and out_dense.in_features == dense.out_features:
            out = f"{parent_name}.output.dense" if parent_name else "output.dense"
            return Site(
                name, out, dense, out_dense, act_name(act), passthrough=out,
                fc1_name=f"{name}.dense", fc2_name=out,
            )  # fmt: skip
    return None


def _site_of(name: str, mod: nn.Module, root: nn.Module) -> Site | None:
    site = _timm_site(name, mod)
    norm = getattr(mod, "norm", None)
    if site is not None and norm is not None and not isinstance(norm, nn.Identity):
        return replace(site, why="a norm over the hidden units couples the learners", norm=f"{name}.norm")
    return site if site is not None else _hf_site(name, mod, root)


def find_sites(model: nn.Module) -> list[Site]:
    """Every MLP of a supported form, outermost first (a site's submodules are not sites)."""
    sites: list[Site] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(s.name + ".") for s in sites):
            continue
        site = _site_of(name, mod, model)
        if site is not None:
            sites.append(site)
    return sites
