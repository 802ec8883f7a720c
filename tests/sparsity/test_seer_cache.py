"""Gate training from the cache of :mod:`edgecompress.sparsity.seer.cache`, and the calibrated threshold.

Oracles and tolerances:

* one loss and its gradients from the cache equal those of a collect call through the live model
  (eval mode), on a padded batch (the cache is built one sample at a time: each trimmed to its own
  width, then padded to the widest) of a tiny BERT and of a tiny Llama (causal, RoPE, GQA, first quarter of the
  rows dropped): float32, relative 1e-5 (the same float ops on the same pooled blocks; measured
  differences ≤ 1e-7 relative);
* ``rule: threshold``: the kept fraction that the calibrated threshold gives on the training data,
  counted by the cores' own block choice through the model (the report's counter), is the density
  within 0.01 (one block of the ~600 allowed is 0.0017; gate probabilities at the threshold may
  round differently through the model).
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.data.samples import SampleSet
from edgecompress.models.loading import load_model
from edgecompress.sparsity.seer.cache import CachedObjective, build_cache, collecting
from edgecompress.sparsity.seer.losses import total_loss
from edgecompress.sparsity.seer.passes import SeerAttention, find_sites
from edgecompress.sparsity.seer.report import recording
from tests.conftest import save_tiny_llama
from tests.sparsity.test_seer_pass import _cores, _run, _text_batches, one_thread  # noqa: F401 (autouse)


def _installed(loaded, batches, **fields):
    from edgecompress.calib import make_context

    model = copy.deepcopy(loaded.model).eval()
    ctx = make_context(batches, loaded.call, torch.device("cpu"), kind=loaded.kind)
    seer = SeerAttention(block=16, **fields)
    cores = list(seer._install(model, find_sites(model, ctx, seer.targets, seer.ignore)).values())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the identity start: gradients of every kind of entry
        for c in cores:
            for p in c.gate.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model, cores, ctx.call


def _loss_and_grads(cores, loss_fn):
    for c in cores:
        c.gate.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for c in cores for p in c.gate.parameters()]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_one_step_from_the_cache_equals_one_through_the_model(arch, tiny_bert_dir, tmp_path):
    if arch == "bert":
        loaded = load_model(f"hf:{tiny_bert_dir}")
    else:
        loaded = load_model(
            f"hf:{save_tiny_llama(tmp_path / 'llama', vocab_size=100, hidden_size=32, intermediate_size=64)}"
        )
    batch = _text_batches(n_batches=1, batch=4, seq=97)[0]  # rows 1 and 3: 9 tokens of padding
    batch["attention_mask"][3, 40:] = 0  # row 3: 40 real tokens (3 blocks of 7)
    model, cores, call = _installed(loaded, [batch])

    def live():
        with collecting(cores):
            call(model, batch)
            return total_loss(cores, 0.25)

    want = _loss_and_grads(cores, live)
    cache, complete = build_cache(model, cores, SampleSet(batch, None, 1), call, 1)
    assert complete and len(cache) == 4
    objective = CachedObjective(cores, 0.25)
    got = _loss_and_grads(cores, lambda: objective(cache.batch(slice(0, 4)).inputs))
    assert cores[0].causal == (arch == "llama") and float(want[0]) > 1e-4
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def test_threshold_rule_keeps_the_density_on_the_training_data(tiny_bert_dir):
    loaded = load_model(f"hf:{tiny_bert_dir}")
    batches = _text_batches(n_batches=2, batch=4, seq=130, seed=4)
    for b in batches:
        b["attention_mask"][:] = 1  # no padding: the choice through the model counts the same rows
    model, records = _run(loaded, batches, steps=3, density=0.4, rule="threshold")
    cal = records[0]["info"]["training"]["calibrated"]
    cores = _cores(model)
    assert all(c.density is None and c.threshold == cal["threshold"] for c in cores.values())
    assert 0 < cal["threshold"] < 1 and abs(cal["kept_train"] - 0.4) <= 0.002, cal
    with torch.no_grad(), recording(cores.values()):
        for b in batches:  # the pass trains on the calibration batches here
            loaded.call(model.eval(), b)
        kept = sum(c.kept.sum().item() for c in cores.values())
        allowed = sum(c.allowed.sum().item() for c in cores.values())
    assert abs(kept / allowed - 0.4) <= 0.01, (kept / allowed, cal)
