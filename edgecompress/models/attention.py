"""Attention in explicit form: an adapter with named slots and a swappable core.

timm and Hugging Face fuse attention into ``scaled_dot_product_attention``; PTQ needs the inputs
of both matmuls and SeerAttention needs to replace the kernel. :class:`AttentionAdapter` is the
common form: it receives per-head ``q, k, v`` (``[B, H, N, D]``; K/V may have fewer heads),
runs them through the slots ``q``, ``k``, ``v`` (:class:`~edgecompress.models.slots.Chain`) and
hands them to its ``core`` (with the decoder's ``position_ids`` when the core says
``TAKES_POSITIONS``). :class:`DenseAttentionCore` computes ``softmax(q kᵀ · scale + bias)``,
the ``probs`` slot, then ``· v``. A pass that replaces the core (a swap of ``<adapter>.core``)
leaves the slots alone; a core that computes the softmax inside a fused kernel says so with
``SUPPORTS_PROBS = False`` and a later PTQ pass quantizes q, k, v around it.

* timm ``Attention`` (ViT, DeiT), Swin ``WindowAttention``, EVA/EVA02 ``EvaAttention`` (RoPE
  applied before the q/k slots) and BEiT ``Attention`` are swapped for subclasses that override
  ``forward`` only and keep every parameter name, so checkpoints load unchanged. EVA and BEiT add
  their q/v biases inside ``F.linear(x, self.qkv.weight, …)``; the explicit forms call ``self.qkv``
  and add the biases after it, so a slot Linear there really runs.
* Hugging Face models are not touched in code: an attention function is registered under the name
  ``"edgecompress"`` through transformers' public ``AttentionInterface`` and each attention module
  gets an ``ec_attn`` child; this covers BERT-style encoders, ViT and Llama-style decoders
  (which pass q/k after RoPE, as the paper's quantizers expect).

The change is one ``explicit_attention`` op in the structure log, replayed by this module.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgecompress.models.slots import Chain
from edgecompress.structure import record, register_op, register_swap, structure_of

HF_IMPL = "edgecompress"
ADAPTER = "ec_attn"
SLOT_ROLES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "probs": "attn_probs"}


@register_swap
class DenseAttentionCore(nn.Module):
    """``probs(softmax(q kᵀ · scale + bias)) @ v`` with grouped-query heads shared (the reference)."""

    VERSION: ClassVar[int] = 1
    SUPPORTS_PROBS: ClassVar[bool] = True

    def forward(self, q, k, v, bias: torch.Tensor | None, scale: float, probs: nn.Module) -> torch.Tensor:
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each K/V head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) * scale  # [B, H, N, M]
        if bias is not None:
            if bias.dtype == torch.bool:
                bias = torch.zeros_like(bias, dtype=scores.dtype).masked_fill(~bias, float("-inf"))
            scores = scores + bias
        return probs(scores.softmax(dim=-1)) @ v  # [B, H, N, D]

    def swap_config(self) -> dict:
        return {}

    @classmethod
    def from_swap(cls, original, config: dict) -> DenseAttentionCore:
        return cls()


class AttentionAdapter(nn.Module):
    """Slots ``q``, ``k``, ``v``, ``probs`` around a swappable ``core``."""

    def __init__(self):
        super().__init__()
        for name, role in SLOT_ROLES.items():
            setattr(self, name, Chain(role))
        self.core: nn.Module = DenseAttentionCore()

    def forward(self, q, k, v, bias: torch.Tensor | None, scale: float, positions=None) -> torch.Tensor:
        q, k, v = self.q(q), self.k(k), self.v(v)  # [B, H, N, D], [B, Hkv, M, D]
        if positions is not None and getattr(self.core, "TAKES_POSITIONS", False):
            return self.core(q, k, v, bias, scale, self.probs, positions=positions)  # RoPE-aware cores
        return self.core(q, k, v, bias, scale, self.probs)


def _adopt(cls: type, original: nn.Module) -> nn.Module:
    """An instance of ``cls`` (a subclass of ``type(original)``) sharing all of original's state."""
    new = cls.__new__(cls)
    new.__dict__.update(original.__dict__)
    new.__dict__["_modules"] = dict(original._modules)
    new.ec_attn = AttentionAdapter()
    return new


def _timm_classes() -> dict[type, type]:
    from timm.layers.attention import Attention
    from timm.models.swin_transformer import WindowAttention

    class ExplicitAttention(Attention):
        """timm ``Attention`` with the non-fused path routed through :class:`AttentionAdapter`."""

        def forward(self, x, attn_mask=None, is_causal=False):
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # [B, H, N, D]
            q, k = self.q_norm(q), self.k_norm(k)
            if is_causal:
                attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            x = self.ec_attn(q, k, v, attn_mask, self.scale)
            x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
            x = self.norm(x)
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    class ExplicitWindowAttention(WindowAttention):
        """timm Swin ``WindowAttention`` with explicit matmuls (relative bias and shift mask kept)."""

        def forward(self, x, mask=None):
            B_, N, _ = x.shape
            qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # [B_, H, N, D]
            bias = self._get_rel_pos_bias()  # [1, H, N, N]
            if mask is not None:
                nw = mask.shape[0]
                bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(B_ // nw, -1, -1, -1, -1)
                bias = bias.reshape(-1, self.num_heads, N, N)
            x = self.ec_attn(q, k, v, bias, self.scale)
            x = x.transpose(1, 2).reshape(B_, N, -1)
            return self.proj_drop(self.proj(x))

    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention, apply_rot_embed_cat

    def qkv_heads(self, x):
        """q, k, v ``[B, H, N, D]`` through ``self.qkv`` itself (timm adds the q/v biases in
        ``F.linear`` with the weight, which would bypass the slot Linear)."""
        B, N, _ = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    class ExplicitEvaAttention(EvaAttention):
        """timm EVA/EVA02 attention with explicit matmuls: RoPE before the q/k slots, gate kept."""

        def forward(self, x, rope=None, attn_mask=None, is_causal=False):
            B, N, C = x.shape
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            if self.qkv is not None:
                q, k, v = qkv_heads(self, x)
            else:
                q, k, v = (
                    p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                    for p in (self.q_proj, self.k_proj, self.v_proj)
                )
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
                q = torch.cat(
                    [q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2
                ).type_as(v)
                k = torch.cat(
                    [k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2
                ).type_as(v)
            if is_causal:
                attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            x = self.ec_attn(q, k, v, attn_mask, self.scale)
            x = self.norm(x.transpose(1, 2).reshape(B, N, -1))  # -1: heads may be pruned
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    class ExplicitBeitAttention(BeitAttention):
        """timm BEiT attention with explicit matmuls (relative and shared position biases kept)."""

        def forward(self, x, shared_rel_pos_bias=None):
            B, N, C = x.shape
            q, k, v = qkv_heads(self, x)
            bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
            if shared_rel_pos_bias is not None:
                bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
            x = self.ec_attn(q, k, v, bias, self.scale)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    return {
        Attention: ExplicitAttention,
        WindowAttention: ExplicitWindowAttention,
        EvaAttention: ExplicitEvaAttention,
        BeitAttention: ExplicitBeitAttention,
    }


_TIMM = None


def _timm_map() -> dict[type, type]:
    global _TIMM
    if _TIMM is None:
        _TIMM = _timm_classes()
    return _TIMM


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: explicit attention through ``module.ec_attn``."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != key.shape[-2]:
        mask = mask[..., : key.shape[-2]]
    out = module.ec_attn(query, key, value, mask, scale, kwargs.get("position_ids"))  # [B, H, N, D]
    return out.transpose(1, 2).contiguous(), None


def _register_hf() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(HF_IMPL, _hf_attention)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import eager_mask

        AttentionMaskInterface.register(HF_IMPL, eager_mask)  # always a materialized additive mask
    except ImportError:  # older transformers build masks without the interface
        pass


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation")


def _set_hf_impl(model: nn.Module) -> None:
    _register_hf()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(HF_IMPL)
    else:
        model.config._attn_implementation = HF_IMPL


def hf_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose forward calls the attention interface: they carry a ``scaling`` attribute."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "scaling") and hasattr(m, "config")]


def adapters(model: nn.Module) -> list[tuple[str, AttentionAdapter]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionAdapter)]


def explicit_attention_(model: nn.Module) -> list[str]:
    """Make every supported attention explicit, in place; returns the attention modules' names.

    Idempotent: a model that already has adapters (from an earlier pass or a replay) is left as
    it is, so a replaced core survives. Records one ``explicit_attention`` op.
    """
    found = adapters(model)
    if found:
        return [n.rpartition(".")[0] for n, _ in found]
    done = []
    if is_hf(model):
        _set_hf_impl(model)
        for name, mod in hf_attention_modules(model):
            mod.ec_attn = AttentionAdapter()
            done.append(name)
    else:
        mapping = _timm_map()
        for name, mod in list(model.named_modules()):
            new_cls = mapping.get(type(mod))
            if new_cls is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, _adopt(new_cls, mod))
                done.append(name)
    structure_of(model)  # make sure the log exists even if nothing matched
    record(model, {"op": "explicit_attention", "modules": done})
    return done


@register_op("explicit_attention")
def _replay(model: nn.Module, op: dict) -> None:
    explicit_attention_(model)
