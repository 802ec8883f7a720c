"""Where an ACM can replace an MLP, found from the module structure (no tracing, no forks):

* timm ``Mlp`` (``fc1 → act → fc2``, ViT / DeiT / Swin / BEiT …), ``SwiGLU`` (``act(fc1_g x) ⊙
  fc1_x x → fc2``) and ``GluMlp`` (EVA02: gate and up fused in ``fc1``, chunked): the whole
  module is swapped; one with a norm over its hidden units (``scale_mlp``) is left dense, since
  the norm couples the learners;
* HF encoder layers (BERT, RoBERTa, ViT …): ``intermediate`` (``dense`` + ``intermediate_act_fn``)
  is swapped for the ACM and the sibling ``output.dense`` for :class:`ACMPassthrough`; the output
  module's dropout, residual and LayerNorm stay the model's;
* HF gated MLPs (Llama, Mistral, Qwen2: ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``).

:func:`build_acm` makes the ACM of a site from its weights: hidden units ranked by
``E|a_j| · ‖W2[:, j]‖`` on the recorded inputs (``a`` the hidden activation) and dealt out in rank
order, so learner 1 holds the most important units and all ``L`` learners together compute
exactly the original MLP (the paper trains learners from random initialisation instead; we start
from this split and distil, see the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from edgecompress.sparsity.acm.modules import ACMMLP, ACMPassthrough
from edgecompress.structure import replace_module


@dataclass(frozen=True)
class Site:
    name: str  # the module swapped for the ACM (its input is the ACM's input)
    out: str  # the module whose output the ACM reproduces (== name, or HF's ``output.dense``)
    fc1: nn.Linear
    fc2: nn.Linear
    act: str | None  # None: an activation we cannot run (the site is skipped, with the reason)
    up: nn.Linear | None = None
    passthrough: str | None = None  # HF: ``output.dense``, replaced by ACMPassthrough
    why: str | None = None  # why it cannot become an ACM (left dense, named in the report)


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
    if _plain_linear(fc1, fc2) and act is not None:
        glu = fc1.out_features == 2 * fc2.in_features and getattr(mod, "chunk_dim", -1) == -1
        if glu:  # GluMlp (EVA02): fc1 holds gate and up, chunked along the features
            gate, up = (1, 0) if getattr(mod, "gate_last", False) else (0, 1)
            return Site(name, name, _half(fc1, gate), fc2, act_name(act), up=_half(fc1, up))
        if fc1.out_features == fc2.in_features:
            return Site(name, name, fc1, fc2, act_name(act))  # timm Mlp
    if _plain_linear(*(getattr(mod, a, None) for a in ("fc1_g", "fc1_x", "fc2"))) and act is not None:
        return Site(name, name, mod.fc1_g, mod.fc2, act_name(act), up=mod.fc1_x)  # timm SwiGLU
    return None


def _site_of(name: str, mod: nn.Module, root: nn.Module) -> Site | None:
    site = _timm_site(name, mod)
    norm = getattr(mod, "norm", None)
    if site is not None and norm is not None and not isinstance(norm, nn.Identity):
        return replace(site, why="a norm over the hidden units couples the learners")
    if site is not None:
        return site
    if _plain_linear(*(getattr(mod, a, None) for a in ("gate_proj", "up_proj", "down_proj"))):
        return Site(
            name, name, mod.gate_proj, mod.down_proj, act_name(getattr(mod, "act_fn", None)), mod.up_proj
        )
    dense, act = getattr(mod, "dense", None), getattr(mod, "intermediate_act_fn", None)
    parent_name, _, leaf = name.rpartition(".")
    if leaf == "intermediate" and isinstance(dense, nn.Linear) and act is not None:
        parent = root.get_submodule(parent_name) if parent_name else root
        out_dense = getattr(getattr(parent, "output", None), "dense", None)
        if isinstance(out_dense, nn.Linear) and out_dense.in_features == dense.out_features:
            out = f"{parent_name}.output.dense" if parent_name else "output.dense"
            return Site(name, out, dense, out_dense, act_name(act), passthrough=out)
    return None


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


@torch.no_grad()
def unit_order(site: Site, inputs: torch.Tensor) -> torch.Tensor:
    """Hidden units by decreasing ``E|a_j|·‖W2[:, j]‖`` on ``inputs`` [T, d] (ties: lower index first)."""
    from edgecompress.sparsity.acm.execute import ACTIVATIONS

    x = inputs.to(site.fc1.weight.dtype)
    a = ACTIVATIONS[site.act](site.fc1(x))
    if site.up is not None:
        a = a * site.up(x)
    score = a.abs().mean(0) * site.fc2.weight.norm(dim=0)  # [hidden]
    return torch.sort(score, descending=True, stable=True).indices


@torch.no_grad()
def build_acm(
    site: Site, n_learners: int, gate_width: int | None, k_min: int, inputs: torch.Tensor
) -> ACMMLP:
    """The ACM that, with all learners, computes exactly the site's MLP (see the module docstring)."""
    hidden, d, d_out = site.fc1.out_features, site.fc1.in_features, site.fc2.out_features
    h = hidden // n_learners
    width = gate_width or default_gate_width(d, hidden, d_out)
    acm = ACMMLP(
        d, d_out, n_learners, h, width, act=site.act, gated=site.up is not None, k_min=k_min,
        out_bias=site.fc2.bias is not None, up_bias=site.up is not None and site.up.bias is not None,
    ).to(device=site.fc1.weight.device, dtype=site.fc1.weight.dtype)  # fmt: skip
    order = unit_order(site, inputs)
    acm.fc1.weight.copy_(site.fc1.weight[order])
    if site.fc1.bias is not None:
        acm.fc1.bias.copy_(site.fc1.bias[order])
    else:
        acm.fc1.bias.zero_()
    if site.up is not None:
        acm.fc_up.weight.copy_(site.up.weight[order])
        if site.up.bias is not None:
            acm.fc_up.bias.copy_(site.up.bias[order])
    acm.fc2.weight.copy_(site.fc2.weight[:, order])
    if site.fc2.bias is not None:
        acm.bias2.copy_(site.fc2.bias)
    return acm


def default_gate_width(d: int, hidden: int, d_out: int) -> int:
    """About 1 % of the MLP's multiply-adds per token (the paper's gate budget), at least 16."""
    return max(16, round(0.01 * (d * hidden + hidden * d_out) / d))


def install(model: nn.Module, site: Site, acm: ACMMLP) -> None:
    """Swap the site for ``acm`` (and HF's output projection for a passthrough), recorded."""
    replace_module(model, site.name, acm)
    if site.passthrough is not None:
        replace_module(model, site.passthrough, ACMPassthrough())
