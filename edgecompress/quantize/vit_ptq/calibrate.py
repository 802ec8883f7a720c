"""The shared calibration procedure of the ViT PTQ passes (see :mod:`edgecompress.quantize.vit_ptq`)."""

from __future__ import annotations

import time

import torch
from torch import nn

from edgecompress.calib import capture, head
from edgecompress.errors import UserError
from edgecompress.models.attention import explicit_attention_
from edgecompress.models.graph import AttnUnit, LinearUnit, block_key, discover_units
from edgecompress.pipeline import Context
from edgecompress.progress import Progress
from edgecompress.quantize.modules import sqnr_db
from edgecompress.quantize.ptq import attention_slots, quantizable_linears
from edgecompress.quantize.reparam import GELU_SHIFT
from edgecompress.quantize.vit_ptq.attn import MatmulParams, search_probs_v, search_qk
from edgecompress.quantize.vit_ptq.fold import fold_verified_
from edgecompress.quantize.vit_ptq.install import install_attention, install_linear
from edgecompress.quantize.vit_ptq.objectives import (
    LinearParams,
    Stopwatch,
    channel_act_search,
    search_linear,
)
from edgecompress.quantize.vit_ptq.ranks import (
    Assigner,
    attention_cost,
    attention_macs,
    exchange_group,
    gather_results,
    linear_cost,
    linear_macs,
)
from edgecompress.quantize.vit_ptq.scoring import unit_dtype
from edgecompress.train import _init_ranks

ATTN_SLOTS = ("q", "k", "v", "probs")
REPORT_SAMPLES = 8
RESULT_TYPES = {"linear": LinearParams, "qk": MatmulParams, "av": MatmulParams}


def _db(ref_power: float, mse: float) -> float:
    return round(10 * float(torch.log10(torch.tensor(ref_power / max(mse, 1e-30)))), 2)


def _subsample_rows(x: torch.Tensor, max_rows: int | None, gen: torch.Generator) -> torch.Tensor:
    if max_rows is None or x.shape[0] <= max_rows:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:max_rows].sort().values]


class _Calibrator:
    """Runs the procedure of the module docstring for one pass configuration (see also
    :mod:`~edgecompress.quantize.vit_ptq.ranks` for the work split under torchrun)."""

    def __init__(self, cfg, model: nn.Module, ctx: Context):
        self.cfg, self.model, self.ctx = cfg, model, ctx
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.example = ctx.example_inputs[0]
        self.ranks = _init_ranks(ctx.device)
        self.assign = Assigner(self.ranks.world)
        self.group = exchange_group(self.ranks.world)
        self.plan: list[tuple] = []  # per unit: (unit, info, owner)
        self.mine: dict[int, dict] = {}  # this rank's search results, by unit index
        self.sw = Stopwatch()
        self.installs: list = []

    def run(self, units) -> None:
        with torch.no_grad():
            self.ref = self.ctx.call(self.model, head(self.example, REPORT_SAMPLES)).detach().clone()
        progress = Progress(f"{self.cfg.name} calibration, unit", len(units))
        for group in _block_groups(units):
            names = [n for u in group for n in _capture_names(u)]
            with self.sw("capture"):
                cache = capture(self.model, names, self.ctx.forward_loop, self.cfg.calib_samples)
            for u in group:
                self._linear(u, cache) if isinstance(u, LinearUnit) else self._attention(u, cache)
                progress.step(_unit_name(u))
            del cache
        with self.sw("exchange"):
            results = gather_results(self.mine, RESULT_TYPES, self.group, self.ctx.device)
        for i, (u, info, owner) in enumerate(self.plan):
            self._install(u, info, owner, results[i])

    def _own(self, cost: float, u, info: dict) -> bool:
        """Record the unit; True when this rank searches it."""
        owner = self.assign.owner(cost)
        self.plan.append((u, info, owner))
        return owner == self.ranks.rank

    def _linear(self, u: LinearUnit, cache) -> None:
        """Inputs (every rank: subsampling and the fold change what later units see), then the search."""
        cfg, info, sw = self.cfg, {}, Stopwatch()
        x = cache.tokens(u.names[0]).float()  # [T, K], padding tokens dropped
        x = _subsample_rows(x, cfg.max_tokens, self.gen)
        lins = [self.model.get_submodule(n) for n in u.names]
        (t, k), o = x.shape, sum(lin.out_features for lin in lins)
        dtype = unit_dtype(cfg.scoring, linear_macs(t, k, o), x.device)
        info["scoring"] = str(dtype).removeprefix("torch.")
        if u.norm is not None and cfg.reparam != "none" and not u.post_gelu:
            with sw("reparam"):
                x = self._reparam(u, x, info, dtype)
        w = torch.cat([lin.effective_weight().float() for lin in lins])  # [O_total, K], after any mask
        info["seconds"] = sw.seconds
        shift = GELU_SHIFT if (u.post_gelu and cfg.post_gelu == "adalog") else None
        if self._own(linear_cost(t, k, o, shift is not None), u, info):
            p = search_linear(x, w, cfg.w_bits, cfg.a_bits, cfg.search_rounds, shift, dtype)
            self.mine[len(self.plan) - 1] = {"linear": p}

    def _reparam(self, u: LinearUnit, x: torch.Tensor, info: dict, dtype: torch.dtype) -> torch.Tensor:
        s_c, z_c = channel_act_search(x, self.cfg.a_bits, dtype)
        folded = fold_verified_(
            self.model, u, s_c, z_c, self.cfg.reparam, self.cfg.a_bits, self.example, self.ref, self.ctx.call
        )
        if folded is None:
            info["reparam"] = "skipped (output not equivalent or no bias)"
            return x
        _, _, r, b = folded
        info["reparam"] = {
            "rule": self.cfg.reparam,
            "norm": u.norm,
            "r_max_over_min": round(float(r.max() / r.min()), 3),
        }
        return x / r - b

    def _attention(self, u: AttnUnit, cache) -> None:
        cfg = self.cfg
        groups = cache.attention_groups([f"{u.name}.{p}" for p in ATTN_SLOTS])  # padding dropped
        q, k, v, a = ([g[i].float() for g in groups] for i in range(4))  # [B_g, H, N_g, ·] each
        if k[0].shape[1] != q[0].shape[1]:
            raise UserError(
                f"{u.name}: grouped-query attention is not supported by {cfg.name} (use uniform_ptq)"
            )
        self._subsample_queries(q, a)
        shapes = [tuple(x.shape) for x in q]
        dtype = unit_dtype(cfg.scoring, attention_macs(shapes), q[0].device)
        if not self._own(attention_cost(shapes), u, {"scoring": str(dtype).removeprefix("torch.")}):
            return
        t0 = time.perf_counter()
        qk = search_qk(q, k, cfg.a_bits, cfg.search_rounds, dtype)
        t1 = time.perf_counter()
        av = search_probs_v(a, v, cfg.a_bits, cfg.a_bits, cfg.softmax_quantizer, cfg.search_rounds, dtype)
        qk.seconds, av.seconds = round(t1 - t0, 3), round(time.perf_counter() - t1, 3)
        self.mine[len(self.plan) - 1] = {"qk": qk, "av": av}

    def _subsample_queries(self, q: list, a: list) -> None:
        """``max_tokens``: keep that many query rows in all (per sample, seeded), in place."""
        samples = sum(x.shape[0] for x in q)
        if self.cfg.max_tokens is None or sum(x.shape[0] * x.shape[2] for x in q) <= self.cfg.max_tokens:
            return
        per_sample = max(1, self.cfg.max_tokens // samples)  # query rows kept per sample
        for i, x in enumerate(q):
            rows = torch.randperm(x.shape[2], generator=self.gen)[:per_sample].sort().values
            q[i], a[i] = x[:, :, rows], a[i][:, :, rows]

    def _install(self, u, info: dict, owner: int, result: dict) -> None:
        """Queue the quantizers of one unit, with its report entries (rank, seconds per search)."""
        cfg = self.cfg
        where = {"rank": owner} if self.ranks.world > 1 else {}
        if isinstance(u, LinearUnit):
            p = result["linear"]
            info.update(layer_sqnr_db=_db(p.ref_power, p.mse), search_rounds=p.rounds, **where)
            info["seconds"] = {**info["seconds"], **p.seconds}
            self.installs.append(lambda: install_linear(self.model, u.names, p, cfg.w_bits, cfg.a_bits, info))
            return
        qk, av = result["qk"], result["av"]
        info["seconds"] = {"q@k": qk.seconds, "A@V": av.seconds}
        self.installs.append(
            lambda: install_attention(self.model, u.name, qk, av, cfg.softmax_quantizer, cfg.a_bits, where)
        )

    def profile(self) -> dict:
        """Seconds per step of the whole calibration and per unit (the report's ``profile``)."""
        units, by = [], dict(self.sw.seconds)
        for u, info, owner in self.plan:
            secs = dict(info.get("seconds", {}))
            units.append({"unit": _unit_name(u), "rank": owner, "scoring": info["scoring"], "seconds": secs})
        for row in units:
            for k, v in row["seconds"].items():
                by[k] = round(by.get(k, 0.0) + v, 3)
        return {
            "scoring": self.cfg.scoring,
            "processes": self.ranks.world,
            "threads": torch.get_num_threads(),
            "seconds": by,
            "units": units,
        }

    def finish(self, linear_names: list[str]) -> None:
        """Install every quantizer, then add the in-model output SQNR of each Linear to its report."""
        ref_out = _linear_outputs(self.model, linear_names, self.example, self.ctx.call)
        for install in self.installs:
            install()
        got = _linear_outputs(self.model, linear_names, self.example, self.ctx.call)
        for n in linear_names:
            q = self.model.get_submodule(n).input_quantizer()
            if hasattr(q, "stats") and n in got:
                q.stats["model_sqnr_db"] = round(sqnr_db(ref_out[n], got[n]), 2)


def _block_groups(units) -> list[list]:
    """Consecutive units of the same block (one capture each)."""
    groups: list[list] = []
    for u in units:
        key = block_key(_unit_name(u))
        if groups and block_key(_unit_name(groups[-1][0])) == key:
            groups[-1].append(u)
        else:
            groups.append([u])
    return groups


def _unit_name(u) -> str:
    return u.names[0] if isinstance(u, LinearUnit) else u.name


def _capture_names(u) -> list[str]:
    return [u.names[0]] if isinstance(u, LinearUnit) else [f"{u.name}.{p}" for p in ATTN_SLOTS]


def _linear_outputs(model: nn.Module, names: list[str], example, call) -> dict[str, torch.Tensor]:
    outs, hooks = {}, []
    try:
        for n in names:
            hooks.append(
                model.get_submodule(n).register_forward_hook(
                    lambda m, a, o, n=n: outs.setdefault(n, o.detach())
                )
            )
        with torch.no_grad():
            call(model, head(example, REPORT_SAMPLES))
    finally:
        for h in hooks:
            h.remove()
    return outs


def _check_attention(model: nn.Module, ctx: Context) -> set[str]:
    """Refuse already-quantized attention slots; return the adapters whose core fuses the softmax
    (left in float here: the A@V search needs the probabilities; noted in the report)."""
    slots = attention_slots(model, ctx)
    adapters = {n.rpartition(".")[0] for n in slots}
    fused = {a for a in adapters if f"{a}.probs" not in slots}
    for a in sorted(fused):
        ctx.notes.append(f"{a}: q, k, v not quantized (the A@V search needs the softmax the core fuses)")
    return fused


def calibrate_(cfg, model: nn.Module, ctx: Context) -> nn.Module:
    """The shared procedure of the three passes (``cfg`` is one of them).

    ``cfg.threads > 0`` sets torch's intra-op threads for the calibration only (restored after):
    the searches run thousands of small tensor ops, and on a CPU shared with other jobs every
    multi-threaded op can wait a scheduler tick for its second thread (measured: 4 ms per op,
    ~20× slower than one thread).
    """
    before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        explicit_attention_(model)
        linears = quantizable_linears(model, cfg.targets, cfg.ignore, ctx)
        fused = _check_attention(model, ctx)
        units = discover_units(model, linears, ctx.example_inputs[0], ctx.call)
        units = [u for u in units if not (isinstance(u, AttnUnit) and u.name in fused)]
        cal = _Calibrator(cfg, model, ctx)
        cal.run(units)
        cal.finish(linears)
        ctx.info["profile"] = cal.profile()
    finally:
        torch.set_num_threads(before)
    return model
