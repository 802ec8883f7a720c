"""Coupled groups: the units structured pruning removes, found from the module structure (no tracing).

A *group* is one attention module's heads or one MLP's hidden channels; a *unit* is what is kept or
removed as a whole, and owns a slice of every tensor it touches (a :class:`Cut`):

* a **head** (timm ``Attention`` / Swin ``WindowAttention`` / ``EvaAttention``; HF BERT/ViT
  self-attention): its rows of q, k and v (timm's fused ``qkv`` holds them as 3 blocks), of the
  q/v biases (EVA), of the gate (gated timm attention), its column of Swin's relative position bias
  table, and its columns of the output projection;
* a **K/V group** (HF Llama-style grouped-query attention): one K/V head with all the query heads
  that share it — removing a query head alone would change how the rest are grouped;
* an MLP **channel** (the sites of :mod:`edgecompress.models.mlp`): a row of fc1 (rows ``j`` and
  ``H + j`` of a fused GluMlp fc1; the gate and up rows of SwiGLU / Llama MLPs) and a column of
  fc2 / down.

Every group names its output projection (``out``: the Linear whose input columns are the units'
outputs, so zeroing those columns removes the units exactly), the size attributes its forward reads
(``attrs``: timm ``num_heads`` / ``attn_dim``, HF ``num_attention_heads`` / ``all_head_size``), and
its residual branch (``entry`` … ``exit``) for removing it whole. Norms over the units (timm
``scale_norm`` / ``scale_mlp``) couple them: such groups are found but left alone, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from edgecompress.models.attention import hf_attention_modules, is_hf
from edgecompress.models.graph import block_key
from edgecompress.models.mlp import Site, find_sites


@dataclass(frozen=True)
class Cut:
    """``repeats`` blocks of ``units × width`` entries along ``dim`` of ``module.tensor``; unit ``u``
    owns entries ``r·units·width + u·width + [0, width)`` of every block ``r``."""

    module: str
    tensor: str
    dim: int
    width: int
    repeats: int = 1

    def indices(self, units: int, keep) -> list[int]:
        span = units * self.width
        return [
            r * span + u * self.width + j
            for r in range(self.repeats)
            for u in keep
            for j in range(self.width)
        ]


@dataclass(frozen=True)
class Group:
    name: str  # the attention / MLP module
    kind: str  # "heads" | "mlp"
    units: int
    out: str  # the output projection Linear: columns [u·col_width, (u+1)·col_width) belong to unit u
    col_width: int
    cuts: tuple[Cut, ...]
    attrs: tuple[tuple[str, str, int], ...] = ()  # (module, attribute, value per kept unit)
    entry: str = ""  # the residual branch: entry (replaced by Skip when != exit) ... exit (a constant)
    exit: str = ""
    tuple_out: bool = False  # the entry returns (output, attention weights): HF attention
    explicit: bool = False  # the module's own forward reshapes to the input width: run it explicit
    why: str | None = None  # why the group is left alone
    label: str = "head"  # what one unit is called in reports
    head_dim: int = 0  # heads: columns per query head (latency table)
    d_in: int = 0  # the group's input width (latency table)
    gated: bool = False  # MLP: a gate and an up projection (latency table)
    act: str | None = None  # MLP: the activation (latency table)
    residual: str | None = None  # the module whose input ``residual_arg`` is the residual stream the
    residual_arg: int = 0  # branch output is added to (same token rows), when that is known


def _linear_cuts(path: str, lin: nn.Linear, dim: int, width: int, repeats: int = 1) -> list[Cut]:
    cuts = [Cut(path, "weight", dim, width, repeats)]
    if dim == 0 and lin.bias is not None:
        cuts.append(Cut(path, "bias", 0, width, repeats))
    return cuts


def _timm_heads(name: str, mod: nn.Module) -> Group | None:
    from timm.layers.attention import Attention
    from timm.models.eva import EvaAttention
    from timm.models.swin_transformer import WindowAttention

    if not isinstance(mod, (Attention, WindowAttention, EvaAttention)):
        return None
    h = mod.num_heads
    hd = mod.proj.in_features // h
    cuts = _linear_cuts(f"{name}.proj", mod.proj, 1, hd)
    if getattr(mod, "qkv", None) is not None:
        cuts += _linear_cuts(f"{name}.qkv", mod.qkv, 0, hd, repeats=3)
        d_in = mod.qkv.in_features
    else:  # EVA with separate projections
        for p in ("q_proj", "k_proj", "v_proj"):
            cuts += _linear_cuts(f"{name}.{p}", getattr(mod, p), 0, hd)
        d_in = mod.q_proj.in_features
    for t in ("q_bias", "k_bias", "v_bias"):
        if getattr(mod, t, None) is not None:
            cuts.append(Cut(name, t, 0, hd))
    if getattr(mod, "gate", None) is not None:
        cuts += _linear_cuts(f"{name}.gate", mod.gate, 0, hd)
    if getattr(mod, "relative_position_bias_table", None) is not None:
        cuts.append(Cut(name, "relative_position_bias_table", 1, 1))
    attrs = [(name, "num_heads", 1)] + ([(name, "attn_dim", hd)] if hasattr(mod, "attn_dim") else [])
    norm = getattr(mod, "norm", None)
    why = (
        None
        if norm is None or isinstance(norm, nn.Identity)
        else "a norm over the heads' outputs couples them"
    )
    explicit = isinstance(mod, EvaAttention)  # its forward reshapes the heads' output to the input width
    return Group(name, "heads", h, f"{name}.proj", hd, tuple(cuts), tuple(attrs), name, name,
                 explicit=explicit, why=why, head_dim=hd, d_in=d_in)  # fmt: skip


def _hf_heads(name: str, mod: nn.Module, root: nn.Module) -> Group | None:
    names = next(
        (t for t in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")) if hasattr(mod, t[0])), None
    )
    hd = getattr(mod, "attention_head_size", None) or getattr(mod, "head_dim", None)
    if names is None or not isinstance(hd, int):
        return None
    q, k, v = (getattr(mod, n) for n in names)
    own_out = next((n for n in ("o_proj", "out_proj") if isinstance(getattr(mod, n, None), nn.Linear)), None)
    parent = name.rpartition(".")[0]
    out = f"{name}.{own_out}" if own_out else f"{parent}.output.dense" if parent else "output.dense"
    try:
        out_mod = root.get_submodule(out)
    except AttributeError:
        return None
    if not isinstance(out_mod, nn.Linear) or not all(isinstance(m, nn.Linear) for m in (q, k, v)):
        return None
    kv = k.out_features // hd
    rep = q.out_features // (kv * hd)  # query heads per K/V head
    cuts = _linear_cuts(f"{name}.{names[0]}", q, 0, rep * hd)
    cuts += _linear_cuts(f"{name}.{names[1]}", k, 0, hd) + _linear_cuts(f"{name}.{names[2]}", v, 0, hd)
    cuts += _linear_cuts(out, out_mod, 1, rep * hd)
    sizes = {
        "num_attention_heads": rep,
        "all_head_size": rep * hd,
        "num_heads": rep,
        "num_key_value_heads": 1,
    }
    attrs = tuple((name, a, per) for a, per in sizes.items() if isinstance(getattr(mod, a, None), int))
    return Group(
        name, "heads", kv, out, rep * hd, tuple(cuts), attrs, name, name if own_out else out,
        tuple_out=True, label="head" if rep == 1 else "K/V group", head_dim=hd, d_in=q.in_features,
    )  # fmt: skip


def _mlp_group(site: Site, root: nn.Module) -> Group:
    hidden = site.fc2.in_features
    cuts = _linear_cuts(site.fc2_name, site.fc2, 1, 1)
    cuts += _linear_cuts(site.fc1_name, root.get_submodule(site.fc1_name), 0, 1, 2 if site.fused else 1)
    if site.up_name is not None:
        cuts += _linear_cuts(site.up_name, site.up, 0, 1)
    why = "a norm over the hidden units couples them" if site.norm is not None else None
    return Group(site.name, "mlp", hidden, site.fc2_name, 1, tuple(cuts), (), site.name, site.out, why=why,
                 label="channel", d_in=site.fc1.in_features, gated=site.up is not None, act=site.act)  # fmt: skip


def find_groups(model: nn.Module) -> list[Group]:
    """Every attention's heads and every MLP's channels of a supported form, in module order."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    groups = [_mlp_group(s, model) for s in find_sites(model)]
    if is_hf(model):
        found = (_hf_heads(n, m, model) for n, m in hf_attention_modules(model))
    else:
        found = (_timm_heads(n, m) for n, m in model.named_modules())
    groups += [g for g in found if g is not None]
    return sorted((_with_residual(model, g) for g in groups), key=lambda g: order[g.name])


PRE_NORMS = (
    ("norm1", "norm2"),
    ("input_layernorm", "post_attention_layernorm"),
    ("layernorm_before", "layernorm_after"),
)


def _with_residual(model: nn.Module, g: Group) -> Group:
    """Where the branch's residual stream can be read: the post-LN output module's second argument
    (HF BERT), else the input of the pre-norm before the branch (timm ``norm1`` / ``norm2``, HF
    ``input_layernorm`` / ``layernorm_before`` …). Not with a layer scale between the branch and the
    sum, nor for window attention (its rows are windows, not the stream's tokens)."""
    parent = model.get_submodule(g.exit.rpartition(".")[0]) if "." in g.exit else model
    if g.exit != g.entry and isinstance(getattr(parent, "LayerNorm", None), nn.LayerNorm):
        return replace(g, residual=g.exit.rpartition(".")[0], residual_arg=1)
    key = block_key(g.name)
    block = model.get_submodule(key) if key != g.name else None
    scaled = any(
        not isinstance(getattr(block, a, None), (nn.Identity, type(None)))
        for a in ("ls1", "ls2", "gamma_1", "gamma_2")
    )
    if block is None or scaled or hasattr(model.get_submodule(g.name), "window_size"):
        return g
    for pair in PRE_NORMS:
        if all(isinstance(getattr(block, n, None), nn.Module) for n in pair):
            return replace(g, residual=f"{key}.{pair[0 if g.kind == 'heads' else 1]}")
    return g


def unit_view(tensor: torch.Tensor, cut: Cut, units: int) -> torch.Tensor:
    """``[units, -1]``: every entry of ``tensor`` that each unit owns under ``cut``."""
    t = tensor.detach().movedim(cut.dim, 0)
    t = t.reshape(cut.repeats, units, cut.width, *t.shape[1:]).transpose(0, 1)
    return t.reshape(units, -1)


def unit_params(model: nn.Module, group: Group) -> int:
    """Parameters one unit of ``group`` owns (buffers such as EVA's zero ``k_bias`` are not counted)."""
    total = 0
    for cut in group.cuts:
        t = getattr(model.get_submodule(cut.module), cut.tensor)
        total += t.numel() // group.units if isinstance(t, nn.Parameter) else 0
    return total
