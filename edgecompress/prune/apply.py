"""Carrying out a pruning plan: additivity check, shrinking, recovery (closed form, then training).

Order: (1) with ``layer_adaptive``, the joint distortion of the chosen allocation is measured with
every group patched at once, to compare with the sum of the single-group distortions the DP
minimised (RD-prune's additivity); (2) the dense outputs the reconstruction targets are recorded;
(3) every group is shrunk (``resize`` ops) or, at zero units, its branch replaced by its constant
(mean output under ``bias`` / ``lstsq``); ``bias`` compensation goes into the kept projections'
biases; (4) ``lstsq`` refits the shrunk projections layer by layer (:mod:`.reconstruct`); the
model-output error on the calibration data is measured before and after; (5) ``recover_steps``
fine-tunes the whole pruned model by distillation from the unpruned one through
:func:`edgecompress.train.fit` (torchrun-ready).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from edgecompress.prune.reconstruct import dense_inputs, dense_targets, reconstruct
from edgecompress.prune.recover import SEQUENTIAL, projection
from edgecompress.prune.shrink import patched, remove_branch, shrink, unit_columns
from edgecompress.train import default_loss, fit


@torch.no_grad()
def joint_error(model: nn.Module, groups, keeps, stats, ref, recovery: str, ridge: float) -> float:
    """The model-output error with every group pruned at once (``model`` unpruned, patched as in the curves)."""
    with contextlib.ExitStack() as stack:
        for g in groups:
            if len(keeps[g.name]) < g.units:
                layer = model.get_submodule(g.out)
                cols = unit_columns(g, keeps[g.name])
                w, b = projection(
                    layer.weight, layer.bias, stats[g.name].gram, cols, recovery, ridge, g.col_width
                )
                stack.enter_context(patched(layer, w, b))
        return ref.error(model=model)


@torch.no_grad()
def shrink_all(model, groups, keeps, stats, recovery: str, ridge: float) -> None:
    for g in groups:
        keep = keeps[g.name]
        if len(keep) == g.units:
            continue
        layer = model.get_submodule(g.out)
        mode = "none" if recovery in SEQUENTIAL and keep else recovery
        w, b = projection(layer.weight, layer.bias, stats[g.name].gram, unit_columns(g, keep), mode, ridge)
        if not keep:
            remove_branch(model, g, b)
            continue
        shrink(model, g, keep)
        if layer.bias is not None and b is not None:
            model.get_submodule(g.out).bias.copy_(b.to(layer.bias.dtype))


def apply_plan(model, groups, keeps, stats, batches, ctx, ref, p, curves) -> dict:
    """Steps (1)–(4) of the module docstring; returns the measurements for the report."""
    info: dict = {}
    pruned = [g for g in groups if len(keeps[g.name]) < g.units]
    if curves is not None:
        predicted = sum(curves[g.name].at(len(keeps[g.name])) for g in groups)
        joint = joint_error(model, groups, keeps, stats, ref, p.recovery, p.ridge)
        info["additivity"] = {"sum_of_single": predicted, "joint": joint,
                              "joint_over_sum": joint / predicted if predicted > 0 else None}  # fmt: skip
    partial = [g for g in (groups if p.refit_kept and pruned else pruned) if keeps[g.name]]
    targets = (
        dense_targets(model, partial, batches, ctx.call) if p.recovery in SEQUENTIAL and partial else None
    )
    inputs = (
        dense_inputs(model, partial, batches, ctx.call)
        if targets and p.recover_inputs and p.recovery == "lstsq"
        else None
    )
    shrink_all(model, groups, keeps, stats, p.recovery, p.ridge)
    rec: dict = {"output_error": ref.error(model=model)}  # model-output MSE on the calibration data
    if targets is not None:
        rec["output_error_before_lstsq"] = rec["output_error"]
        rec["layers"] = reconstruct(
            model,
            partial,
            batches,
            ctx.call,
            targets,
            p.ridge,
            p.recovery,
            p.ridge_folds,
            inputs,
            p.norm_weighted,
        )
        rec["output_error"] = ref.error(model=model)
    info["recovery"] = rec
    return info


def recover_by_training(model: nn.Module, ctx, p) -> dict:
    """Distillation fine-tuning of the pruned model (``recover_steps``), the recipe's ``train:`` defaults."""
    cfg = ctx.train.override(steps=p.recover_steps, lr=p.recover_lr, batch_size=p.batch_size)
    loss = default_loss(ctx.teacher, ctx.call, ctx.kind)
    res = fit(model, loss, ctx.batches("train"), cfg, device=ctx.device, desc="prune recovery")
    return {"steps": res.steps, "final_loss": res.final_loss, "seconds": round(res.seconds, 1),
            "losses": res.losses, "world_size": res.world_size}  # fmt: skip
