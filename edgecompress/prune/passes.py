"""The ``prune_structured`` pass (see :mod:`edgecompress.prune`)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from edgecompress.errors import UserError
from edgecompress.models.graph import block_key
from edgecompress.models.targeting import matches
from edgecompress.pipeline import Context, register_pass
from edgecompress.prune import plan as P
from edgecompress.prune.aim import WholeModel, aim, shrunk_copy, timing_inputs
from edgecompress.prune.apply import apply_plan, recover_by_training
from edgecompress.prune.calibrate import Stats, collect
from edgecompress.prune.curves import Curve, Reference, sample_options
from edgecompress.prune.groups import Group, find_groups, unit_view
from edgecompress.prune.importance import IMPORTANCES, activation, distortion, kept, magnitude, obs, ranking
from edgecompress.prune.recover import RECOVERIES, projection
from edgecompress.prune.report import summarise
from edgecompress.prune.shrink import patched, unit_columns

GRANULARITIES = ("heads", "mlp", "blocks")
ALLOCATIONS = ("uniform", "layer_adaptive")
MEASURES = ("params", "flops", "latency")
AFTER_QUANT = "pruning reshapes the Linears the quantizers were calibrated on: prune first, then quantize"
AFTER_SPARSITY = "pruning would drop the N:M masks' layout: prune first, then learn N:M masks"
AFTER_DYNAMIC = "the MLPs are ACMs now and have no channels to prune: prune first"


@dataclass
class Prepared:
    groups: list[Group]
    batches: list
    stats: dict[str, Stats]
    orders: dict[str, torch.Tensor]
    table: P.Table
    ref: Reference
    curves: dict[str, Curve] | None
    seconds: float


@register_pass
@dataclass(frozen=True)
class PruneStructured:
    """Structured pruning of heads, MLP channels and whole residual branches that really shrinks the model.

    The package docstring (:mod:`edgecompress.prune`) has the methods, the papers and the choices
    made where they are silent."""

    name: ClassVar[str] = "prune_structured"
    family: ClassVar[str] = "prune"
    VERSION: ClassVar[int] = 1
    needs_data: ClassVar[bool] = True
    cannot_follow: ClassVar[dict] = {
        "quantize": AFTER_QUANT,
        "sparsity": AFTER_SPARSITY,
        "dynamic": AFTER_DYNAMIC,
    }

    granularity: tuple[str, ...] = ("heads", "mlp")
    importance: str = "activation"
    allocation: str = "layer_adaptive"
    budget: dict = field(default_factory=lambda: {"params": 0.5})
    round_to: int = 8
    recovery: str = "lstsq"
    ridge: float = 1.0
    ridge_folds: int = 4
    recover_inputs: bool = True
    refit_kept: bool = True
    norm_weighted: bool = True
    recover_steps: int = 0
    recover_lr: float | None = None
    batch_size: int | None = None
    curve_points: int = 9
    curve_folds: int = 1
    curve_samples: int = 0
    latency_points: int = 13
    latency_batch: int = 8
    latency_seq: int = 128
    latency_seconds: float = 2.0
    latency_rounds: int = 4
    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        _check_budget(self.budget)
        choices = [("granularity", set(self.granularity) <= set(GRANULARITIES) and len(self.granularity) > 0, GRANULARITIES),
                   ("importance", self.importance in IMPORTANCES, IMPORTANCES),
                   ("allocation", self.allocation in ALLOCATIONS, ALLOCATIONS),
                   ("recovery", self.recovery in RECOVERIES, RECOVERIES)]  # fmt: skip
        for name, ok, valid in choices:
            if not ok:
                raise ValueError(f"{name} must be {'a non-empty list of ' if name == 'granularity' else ''}"
                                 f"{' | '.join(valid)}, got {getattr(self, name)!r}")  # fmt: skip
        ints = [("round_to", 1), ("recover_steps", 0), ("curve_points", 2), ("latency_points", 2),
                ("latency_batch", 1), ("latency_seq", 1), ("latency_rounds", 0), ("curve_folds", 1), ("ridge_folds", 1), ("curve_samples", 0)]  # fmt: skip
        for name, low in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("recover_inputs", "refit_kept", "norm_weighted"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("ridge", "latency_seconds"):
            v = getattr(self, name)
            if not (_num(v) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")

    @property
    def needs_teacher(self) -> bool:
        return self.recover_steps > 0

    @property
    def needs_training(self) -> bool:
        return self.recover_steps > 0

    @property
    def measure(self) -> str:
        return next(iter(self.budget))

    # ---- the pass ---------------------------------------------------------------------------------

    def groups(self, model: nn.Module, ctx: Context) -> list[Group]:
        out = []
        for g in find_groups(model):
            mod = model.get_submodule(g.name)
            if not matches(g.name, mod, self.targets) or matches(g.name, mod, self.ignore):
                continue
            if g.why is not None:
                ctx.notes.append(f"{g.name}: {g.label}s kept ({g.why})")
            out.append(g)
        if not out:
            raise UserError("prune_structured: no attention or MLP of a supported form matched the targets")
        return out

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return self.execute(model, ctx, self.prepare(model, ctx))

    def prepare(self, model: nn.Module, ctx: Context) -> Prepared:
        """Everything the allocation needs, measured on the unpruned ``model`` (it stays unchanged):
        statistics, unit rankings, the cost table and, for ``layer_adaptive``, the distortion curves.
        Another instance differing only in ``budget`` (same measure), ``allocation`` or the
        ``recover_*`` fields may :meth:`execute` with it (benchmarks reuse the curves this way)."""
        t0 = time.perf_counter()
        groups = self.groups(model, ctx)
        batches = list(ctx.batches("calib"))
        stats = collect(model, groups, batches, ctx.call, taylor=self.importance == "taylor")
        orders = {g.name: ranking(self.score(model, g, stats[g.name])) for g in groups}
        table = self.table(model, groups, stats, ctx)
        groups = [g for g in groups if g.name in table.options]
        measured = _first_samples(batches, self.curve_samples)  # the curves' (and reports') data
        ref = Reference(model, groups, measured, ctx.call, pooled=ctx.kind == "encoder")
        curves = (
            self.curves(model, groups, orders, table, self.folds(model, groups, stats, ref, measured, ctx))
            if self.allocation == "layer_adaptive"
            else None
        )
        return Prepared(groups, batches, stats, orders, table, ref, curves, time.perf_counter() - t0)

    def execute(self, model: nn.Module, ctx: Context, prep: Prepared) -> nn.Module:
        """Allocate, shrink and recover ``model`` (an unpruned model equal to the one ``prep`` measured)."""
        t0 = time.perf_counter()
        curves = prep.curves if self.allocation == "layer_adaptive" else None
        widths, aimed = self.allocate(prep.table, curves), None
        if self.measure == "latency" and self.latency_rounds:
            widths, aimed = self.aim(model, ctx, prep, curves)
        keeps = _agree(
            {g.name: kept(prep.orders[g.name], widths[g.name]) for g in prep.groups}, prep.groups, ctx.device
        )
        info = apply_plan(
            model, prep.groups, keeps, prep.stats, prep.batches, ctx, prep.ref, self, prep.curves
        )
        if aimed is not None:
            info["latency_aim"] = aimed
        if self.recover_steps:
            ctx.info["training"] = recover_by_training(model, ctx, self)
        seconds = {"plan": round(prep.seconds, 2), "prune_and_recover": round(time.perf_counter() - t0, 2)}
        summarise(ctx, model, prep.groups, keeps, prep.table, prep.curves, info, self, seconds)
        return model

    def score(self, model: nn.Module, g: Group, st: Stats) -> torch.Tensor:
        out = model.get_submodule(g.out)
        if self.importance == "magnitude":
            return magnitude(
                [unit_view(getattr(model.get_submodule(c.module), c.tensor), c, g.units) for c in g.cuts]
            )
        if self.importance == "taylor":
            return st.taylor
        if self.importance == "activation":
            return activation(out.weight, st.x_norm, g.units, g.col_width)
        if self.importance == "obs":
            return obs(out.weight, out.bias, st.gram, g.units, g.col_width, self.ridge)
        return distortion(out.weight, st.gram[:-1, :-1], g.units, g.col_width)

    def table(self, model, groups, stats, ctx) -> P.Table:
        options = P.options_of(groups, self.granularity, self.round_to)
        if self.measure != "latency":
            return P.static_costs(model, groups, options, stats, self.measure)
        threads = torch.get_num_threads()
        return P.latency_costs(groups, options, stats, self.latency_batch, self.latency_seq, ctx.kind != "image",
                               threads, self.latency_seconds, self.latency_points)  # fmt: skip

    def folds(self, model, groups, stats, ref: Reference, batches, ctx) -> list[tuple]:
        """``(statistics the recovery is fit on, reference it is measured on, weight)`` per fold: the
        whole calibration set once, or with ``curve_folds: K`` (and a recovery that fits), K-fold
        cross-fitting over the batches (round-robin), weighted by the fold's samples."""
        if self.curve_folds == 1 or self.recovery not in ("lstsq", "scale", "bias") or len(batches) < 2:
            return [(stats, ref, 1.0)]
        k = min(self.curve_folds, len(batches))
        total = sum(len(b) for b in batches)
        out = []
        for i in range(k):
            held, fit = batches[i::k], [b for j, b in enumerate(batches) if j % k != i]
            out.append((collect(model, groups, fit, ctx.call), Reference(model, groups, held, ctx.call, ref.pooled),
                        sum(len(b) for b in held) / total))  # fmt: skip
        return out

    @torch.no_grad()
    def curves(self, model, groups, orders, table, folds) -> dict[str, Curve]:
        """Each group's distortion at ``curve_points`` of its options, the rest of the model dense: the
        recovery fit on each fold's statistics, measured on its reference (:meth:`folds`)."""
        out = {}
        for g in groups:
            layer = model.get_submodule(g.out)
            curve = Curve(table.options[g.name], {g.units: 0.0})
            for k in sample_options(table.options[g.name], self.curve_points):
                if k < g.units:
                    cols = unit_columns(g, kept(orders[g.name], k))
                    curve.measured[k] = 0.0
                    for st, ref, weight in folds:
                        w, b = projection(layer.weight, layer.bias, st[g.name].gram, cols, self.recovery, self.ridge, g.col_width)  # fmt: skip
                        with patched(layer, w, b):
                            curve.measured[k] += weight * ref.error(block_key(g.name))
            out[g.name] = curve
        return out

    def allocate(
        self, table: P.Table, curves: dict[str, Curve] | None, budget: float | None = None
    ) -> dict[str, int]:
        budget = self.budget[self.measure] if budget is None else budget
        widths = P.allocate_widths(table, budget, _values(table, curves))
        if widths is None:
            raise UserError(
                f"prune_structured: budget {self.measure}={budget} would delete every head or channel of a "
                f"layer (at most {P.max_removable(table):.3f} can go otherwise{'' if self.allocation == 'layer_adaptive' else ' at a uniform ratio'}); "
                "lower the budget or add 'blocks' to granularity"
            )  # fmt: skip
        return widths

    def aim(self, model, ctx, prep: Prepared, curves) -> tuple[dict[str, int], dict]:
        """The ``latency`` budget checked on the whole model in ORT, corrected for a few rounds (:mod:`.aim`)."""
        feeds = timing_inputs(
            ctx.example_inputs[0], self.latency_batch, self.latency_seq, ctx.kind != "image"
        )
        with tempfile.TemporaryDirectory(prefix="ec-aim-") as tmp:
            empty = shrunk_copy(model, prep.groups, {g.name: [] for g in prep.groups}, prep.stats)
            args = (ctx.call, feeds, torch.get_num_threads(), self.latency_seconds, Path(tmp))
            whole = WholeModel(model, empty, *args)

            def measure(budget: float) -> tuple[float, float, float]:
                widths = self.allocate(prep.table, curves, budget)
                keeps = {g.name: kept(prep.orders[g.name], widths[g.name]) for g in prep.groups}
                return whole.measure(shrunk_copy(model, prep.groups, keeps, prep.stats))

            highest = P.feasible_max(prep.table, _values(prep.table, curves))
            budget, record = aim(self.budget["latency"], highest, measure, self.latency_rounds)
        return self.allocate(prep.table, curves, budget), record


def _first_samples(batches: list, n: int) -> list:
    """The first batches holding at least ``n`` samples (all for 0)."""
    out, count = [], 0
    for b in batches:
        if n and count >= n:
            break
        out.append(b)
        count += len(b)
    return out


def _values(table: P.Table, curves) -> dict[str, list[float]] | None:
    return None if curves is None else {n: curves[n].values() for n in table.options}


def _check_budget(budget) -> None:
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in MEASURES:
        raise ValueError(f"budget must be one of {{params: x}}, {{flops: x}}, {{latency: x}}, got {budget!r}")
    value = next(iter(budget.values()))
    if not (_num(value) and 0 < value < 1):
        raise ValueError(f"budget {next(iter(budget))} must be a fraction in (0, 1) to remove, got {value!r}")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _agree(keeps: dict[str, list[int]], groups: list[Group], device) -> dict[str, list[int]]:
    """Under torchrun every rank must shrink the same way: rank 0's kept units are broadcast."""
    from edgecompress.train import broadcast_from_rank0

    mask = torch.zeros(sum(g.units for g in groups), dtype=torch.int64)
    start = 0
    for g in groups:
        mask[[start + u for u in keeps[g.name]]] = 1
        start += g.units
    mask = broadcast_from_rank0(mask, device)
    out, start = {}, 0
    for g in groups:
        out[g.name] = [u for u in range(g.units) if mask[start + u]]
        start += g.units
    return out
