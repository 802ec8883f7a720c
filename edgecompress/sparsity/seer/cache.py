"""Gate training from a cache: the gates' inputs and targets computed once, the optimisation on them only.

The base model is frozen and a gate reads nothing of it but the pooled Q and K of its layer; its
target (:func:`~.execute.pooled_truth`) depends on the frozen model alone. So one pass of the model
over the training samples (eval mode, no gradient) gives, per sample and layer, everything a
training step needs: the pooled blocks of :meth:`~.gate.AttnGate.pool` (``q`` ``[H, nb, D]``, ``k``
``[Hkv, nb, 3D]``), the block positions on RoPE models, the target ``[H, nb, nb]`` and the real
query blocks ``[nb]`` (float32, padded to the widest sample: padded blocks are not real, so they
weigh 0 in :func:`~.losses.layer_kl` and no real block sees them). A step then runs
:meth:`~.gate.AttnGate.logits` on a batch of the cache and the same :func:`~.losses.total_loss` —
milliseconds instead of a forward of the whole model — through :func:`edgecompress.train.fit`
(torchrun-ready: every rank builds the same cache; ``fit`` splits its batches).

Choices: the targets come from the model in eval mode (dropout off: the gate learns the attention
that inference sees; the live path of the pass ran the model in train mode). A cache that passes
:data:`LIMIT_BYTES` stops growing: the pass then trains through the live model (and calibrates a
threshold on the samples cached).
Measured on demo:minilm (512-token windows of the built-in texts, 6 layers of 12 heads of 32 dims;
xeon-amx, 2 cores shared, load 4-6; ``benchmarks/seer_gate_curve.py`` and ``benchmarks/seer.py
--parts minilm``, results ``benchmarks/results/seer-xeon-amx-2026-12-06.json``):

* size: 0.66 MB a sample at block 32, 1.5 MB at block 16 (178 training windows: 118 / 263 MB),
  built in 140-155 s (one eval-mode pass of the model);
* speed: 2000 steps of 8 samples in 14 s (block 32) / 31 s (block 16) on one thread (see
  :func:`one_thread`), the whole pass
  (cache, training, held-out KL, report) 118 / 159 s; through the live model the same pass took
  1859 s for 60 steps (loaded machine, two threads);
* the held-out KL (20 test windows) levels off by 2000 steps at AdamW lr 1e-3, batch 8, cosine
  schedule: block 32 0.645 after 2000-3000 steps (lr 3e-4: 0.650, 3e-3: 0.661 — lower training
  KL, higher held-out: over-fitting the 23 distinct training windows), block 16 0.804 / 0.803
  (3e-4: 0.814, 3e-3: 0.809); weight decay 0.1 changes nothing. The recipe ``seer_d50`` uses
  2000 steps of 8 at 1e-3 (the steps and lr were picked on these test windows' KL; the embedding
  cosines reported were not used to pick anything). Windows every 40 tokens instead of 64 (285,
  block boundaries at other offsets): block 16 0.793 after 2000 steps, 0.789 after 4000 (cosines
  below unchanged: top-k 0.9732, threshold 0.9831);
* embedding cosine to the dense model on the 20 test windows, density 0.5, gates of 2000 steps
  (block 16, windows every 64 tokens; at the same kept fraction the oracles of
  ``benchmarks/seer_quality.py``): per-row top-k 0.973 (oracle block-max 0.976, oracle mass 0.977,
  random 0.969, static 0.966); the threshold calibrated here (0.0146, kept 0.516 on the test
  windows) 0.983, where the oracle's variable budget (fewest blocks holding 85 / 90 % of the true
  mass) gives 0.989 at 0.484 and 0.994 at 0.550 kept. Block 32: top-k 0.962, threshold 0.970
  (oracle top-k 0.967). At density 0.3 / 0.1 the block-16 gate equals the oracle (0.933 / 0.802).
  With ``dropped: mean`` (the dropped blocks' estimates; run on this branch merged with it): top-k
  0.990 (oracle 0.992), calibrated threshold 0.994 at 0.509 kept.

:func:`calibrate_threshold` (the pass's ``rule: threshold``) picks one threshold on the gate
probabilities of the training samples so that the mean kept fraction of the allowed blocks, forced
blocks included, over every layer, head and real row is the requested density. The paper and the
official code set the threshold by hand (2e-3, 5e-4) and report the density it gives; calibrating
it to a density is our choice, so that it compares with the per-row top-k at the same budget.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.data.samples import Batch, SampleSet
from edgecompress.sparsity.seer.gate import allowed_blocks
from edgecompress.sparsity.seer.losses import total_loss
from edgecompress.sparsity.seer.masks import forced_blocks

LIMIT_BYTES = 4 * 2**30
FIELDS = ("q", "k", "truth", "rows", "pos")


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Context: on the CPU, torch ops run on one thread; the thread count is restored. A cached step is
    a few small einsums: measured (block 32, batch 8, alternated) 121 steps/s on one thread vs 137 on
    two on the idle 2-core machine, but 70-110 vs 4.5-7.4 at nice 19 beside other jobs (load 4-5),
    where the second thread waits to be scheduled (``seer_gate_curve.py --thread-check``)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class collecting:
    """Context: the cores return dense attention and keep their gate logits and targets."""

    def __init__(self, cores):
        self.cores = list(cores)

    def __enter__(self):
        for c in self.cores:
            c.collect = True
        return self.cores

    def __exit__(self, *exc):
        for c in self.cores:
            c.collect, c.last = False, None


def _entries(cores: list) -> dict[str, torch.Tensor]:
    """What one collect call left in the cores, per layer ``i``: ``i.q``, ``i.k``, ``i.truth``, ``i.rows``, ``i.pos``."""
    out = {}
    for i, c in enumerate(cores):
        qa, kb, pos = c.gate.pooled
        truth = c.last["truth"].float()
        out.update({f"{i}.q": qa.float(), f"{i}.k": kb.float(), f"{i}.truth": truth})
        out[f"{i}.rows"] = c.last["rows"].float().expand(truth.shape[0], truth.shape[-1])
        if pos is not None:
            out[f"{i}.pos"] = pos.expand(truth.shape[0], truth.shape[-1])
    return out


def _pad(name: str, t: torch.Tensor, nb: int) -> torch.Tensor:
    """Pad the block dims of one field to ``nb`` blocks (zeros: not real, no mass)."""
    extra = nb - t.shape[-1 if name.endswith((".rows", ".pos", ".truth")) else -2]
    if extra == 0:
        return t
    if name.endswith(".truth"):
        return F.pad(t, (0, extra, 0, extra))
    if name.endswith((".rows", ".pos")):
        return F.pad(t, (0, extra))
    return F.pad(t, (0, 0, 0, extra))


@torch.no_grad()
def build_cache(model: nn.Module, cores: list, data, call, batch_size: int, limit: int = LIMIT_BYTES):
    """``(cache, complete)``: the gates' inputs and targets for the samples of ``data`` on the CPU, in
    its order and form — a :class:`SampleSet` (built in batches of ``batch_size``, padded to one
    width) or a list of batches (one cached batch each, so that ``fit`` cycles them as it would the
    list) — and whether that is every sample: building stops after the batch that passes ``limit``
    bytes. The model runs in eval mode; its mode is restored."""
    was, parts, size = model.training, [], 0
    model.eval()
    for c in cores:
        c.gate.keep_pooled = True
    try:
        with collecting(cores):
            for batch in data.with_batch_size(batch_size) if isinstance(data, SampleSet) else data:
                call(model, batch)
                parts.append({k: v.cpu() for k, v in _entries(cores).items()})
                size += sum(v.numel() * v.element_size() for v in parts[-1].values())
                if size > limit:
                    break
    finally:
        for c in cores:
            c.gate.keep_pooled, c.gate.pooled = False, None
        model.train(was)
    if not isinstance(data, SampleSet):
        return [Batch(p) for p in parts], size <= limit
    nb = max(p["0.rows"].shape[-1] for p in parts)
    cache = {k: torch.cat([_pad(k, p[k], nb) for p in parts]) for k in parts[0]}
    return SampleSet(cache, None, batch_size), size <= limit


def samples(cache) -> int:
    return len(cache) if isinstance(cache, SampleSet) else sum(len(b) for b in cache)


def cached_last(core, inputs: dict, i: int) -> dict:
    """What a collect call of layer ``i`` keeps (``logits``, ``truth``, ``rows``), from a cache batch."""
    rows = inputs[f"{i}.rows"]
    allowed = allowed_blocks(rows.shape[-1], core.causal, rows.bool(), rows.device)
    logits = core.gate.logits(inputs[f"{i}.q"], inputs[f"{i}.k"], inputs.get(f"{i}.pos"), allowed)
    return {"logits": logits, "truth": inputs[f"{i}.truth"], "rows": rows}


class CachedObjective(nn.Module):
    """``forward(cache batch inputs)`` = :func:`~.losses.total_loss` of the gates on that batch; the
    gates are its submodules (DDP sees them)."""

    def __init__(self, cores: list, skip_first: float):
        super().__init__()
        self.gates = nn.ModuleList(c.gate for c in cores)
        self.__dict__["cores"] = list(cores)
        self.skip_first = skip_first

    def forward(self, inputs: dict) -> torch.Tensor:
        try:
            for i, c in enumerate(self.cores):
                c.last = cached_last(c, inputs, i)
            return total_loss(self.cores, self.skip_first)
        finally:
            for c in self.cores:
                c.last = None


@torch.no_grad()
def cached_kl(cores: list, cache, skip_first: float) -> float:
    """Mean over the cache's samples of the summed-over-layers KL(truth ‖ gate) (as ``held_out_kl``)."""
    objective, total = CachedObjective(cores, skip_first), 0.0
    for batch in cache:
        total += float(objective(batch.inputs)) * len(batch)
    return total / samples(cache)


@torch.no_grad()
def calibrate_threshold(cores: list, cache, density: float) -> tuple[float, float]:
    """One threshold on the gate probabilities such that the kept fraction of the allowed blocks of
    ``cache`` (forced ones included) is ``density``; returns it and the kept fraction it gives."""
    probs, forced_count, allowed_count = [], 0, 0
    for batch in cache:
        for i, c in enumerate(cores):
            last = cached_last(c, batch.inputs, i)
            rows = last["rows"].bool()
            nb = rows.shape[-1]
            allowed = allowed_blocks(nb, c.causal, rows, rows.device) & rows[:, None, :, None]
            allowed = allowed.expand_as(last["logits"])
            forced = forced_blocks(nb, c.causal, c.keep_diagonal, c.keep_first, c.dense_last_rows) & allowed
            p = last["logits"].float().softmax(-1)
            probs.append(p[allowed & ~forced])
            forced_count += int(forced.sum())
            allowed_count += int(allowed.sum())
    free = torch.cat(probs)
    want = round(density * allowed_count) - forced_count  # blocks the threshold must keep
    if want <= 0:
        t = float(free.max()) if free.numel() else 0.0
    elif want >= free.numel():
        t = 0.0
    else:
        t = float(free.kthvalue(free.numel() - want).values)  # exactly `want` values lie above it
    kept = (forced_count + int((free > t).sum())) / max(allowed_count, 1)
    return t, kept
