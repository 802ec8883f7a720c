"""Where an ACM can replace an MLP: the sites of :mod:`edgecompress.models.mlp` (timm ``Mlp`` /
``SwiGLU`` / ``GluMlp``, HF encoder layers, HF gated MLPs). The whole MLP module is swapped; one
with a norm over its hidden units (``scale_mlp``) is left dense, since the norm couples the
learners; in HF encoder layers ``intermediate`` is swapped for the ACM and the sibling
``output.dense`` for :class:`ACMPassthrough` (the output module's dropout, residual and LayerNorm
stay the model's).

:func:`build_acm` makes the ACM of a site from its weights: hidden units ranked by
``E|a_j| · ‖W2[:, j]‖`` on the recorded inputs (``a`` the hidden activation) and dealt out in rank
order, so learner 1 holds the most important units and all ``L`` learners together compute
exactly the original MLP (the paper trains learners from random initialisation instead; we start
from this split and distil, see the package docstring).
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.models.mlp import Site, act_name, find_sites
from edgecompress.sparsity.acm.modules import ACMMLP, ACMPassthrough
from edgecompress.structure import replace_module

__all__ = ["Site", "act_name", "build_acm", "default_gate_width", "find_sites", "install", "unit_order"]


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
