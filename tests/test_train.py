"""The training helper (DESIGN §10: oracles are hand-written loops, formulas and single-process runs).

Every test names its oracle and tolerance in its docstring. Tiny MLPs with odd sizes (59 / 97 / 13)
keep the file to seconds; the DDP test launches 2 CPU processes (gloo) with torchrun.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.data.samples import Batch, SampleSet
from edgecompress.errors import UserError
from edgecompress.train import TrainConfig, _Ranks, _share, default_loss, distill_loss, fit, task_loss
from tests import train_worker

N_SAMPLES, BATCH = 17, 5  # 4 steps per epoch, the last batch of 2


def _mlp(seed: int = 0, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    extra = [nn.BatchNorm1d(97), nn.Dropout(0.3)] if dropout else []
    return nn.Sequential(nn.Linear(59, 97), *extra, nn.GELU(), nn.Linear(97, 13))


def _data() -> SampleSet:
    g = torch.Generator().manual_seed(1)
    return SampleSet(torch.randn(N_SAMPLES, 59, generator=g), torch.randint(0, 13, (N_SAMPLES,), generator=g))


def _ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch.inputs), batch.labels)


def _jitter(batch: Batch, gen: torch.Generator) -> Batch:
    return Batch(batch.inputs + 0.1 * torch.randn(batch.inputs.shape, generator=gen), batch.labels)


def _formula(s: int, steps: int, w: int, schedule: str) -> float:
    """The schedule as the brief states it (written independently of ``lr_factor``)."""
    warm = min(1.0, (s + 1) / w) if w > 0 else 1.0
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))), "linear": max(0.0, 1 - s / steps)}
    return warm * decay.get(schedule, 1.0)


def _hand_loop(model: nn.Module, data: SampleSet, cfg: TrainConfig) -> None:
    """The loop fit must reproduce: per-epoch randperm from one generator, augment, step, schedule."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        opt = cls(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _formula(s, cfg.steps, cfg.warmup_steps, cfg.schedule)
    )
    model.train()
    step = 0
    while step < cfg.steps:
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), cfg.batch_size):
            if step == cfg.steps:
                break
            batch = _jitter(data.batch(perm[i : i + cfg.batch_size]), gen)
            opt.zero_grad(set_to_none=True)
            _ce(model, batch).backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1


@pytest.mark.parametrize(
    "optimizer,schedule,clip", [("adamw", "cosine", 0.5), ("adam", "linear", None), ("sgd", "constant", 1.0)]
)
def test_fit_equals_hand_written_loop(optimizer, schedule, clip):
    """Oracle: the same optimizer / schedule / shuffle / augmentation written out by hand; exact (torch.equal).

    11 steps cross two epoch boundaries of 17 samples in batches of 5 (last batch 2).
    """
    cfg = TrainConfig(
        steps=11, lr=3e-2, optimizer=optimizer, weight_decay=0.01, schedule=schedule, warmup_steps=3,
        batch_size=BATCH, grad_clip=clip, seed=7, log_every=1,
    )  # fmt: skip
    ref, got = _mlp(), _mlp()
    _hand_loop(ref, _data(), cfg)
    result = fit(got, _ce, _data(), cfg, augment=_jitter)
    assert result.steps == 11 and [s for s, _ in result.losses] == list(range(1, 12))
    assert result.world_size == 1 and result.resumed_from is None
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))


def test_a_list_of_batches_is_cycled_in_order():
    """Oracle: a hand-written SGD loop over batches 0, 1, 2, 0, 1, ...; exact (torch.equal)."""
    data = _data()
    batches = [data.batch(slice(0, 6)), data.batch(slice(6, 9)), data.batch(slice(9, 17))]
    cfg = TrainConfig(steps=7, lr=0.1, optimizer="sgd", momentum=0.5, schedule="constant")
    ref, got = _mlp(), _mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    for s in range(7):
        opt.zero_grad(set_to_none=True)
        _ce(ref, batches[s % 3]).backward()
        opt.step()
    fit(got, _ce, batches, cfg)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))


def test_a_non_finite_loss_stops_before_the_update():
    """Oracle: the parameters before the step; exact. The error is one line (UserError)."""
    model = _mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UserError, match="training loss is nan at step 1") as e:
        fit(model, lambda m, b: _ce(m, b) * float("nan"), _data(), TrainConfig(steps=2, batch_size=BATCH))
    assert "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _RecordingSGD(torch.optim.SGD):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.used: list[float] = []

    def step(self, closure=None):
        self.used.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 4, 30])  # 30 > steps: the warm-up is cut short
def test_lr_at_every_step_equals_the_formula(schedule, warmup):
    """Oracle: the brief's formula at every 0-based step; tolerance: rel 1e-12 (the same float math)."""
    cfg = TrainConfig(steps=20, lr=0.5, schedule=schedule, warmup_steps=warmup, batch_size=BATCH)
    seen: list[_RecordingSGD] = []

    def make(params, c):
        seen.append(_RecordingSGD(params, lr=c.lr))
        return seen[0]

    fit(_mlp(), _ce, _data(), cfg, make_optimizer=make)
    want = [0.5 * _formula(s, 20, warmup, schedule) for s in range(20)]
    assert len(seen[0].used) == 20
    assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for a, b in zip(seen[0].used, want))


@pytest.mark.parametrize("every,stop_at", [(3, 4), (4, 5)])  # resume mid-epoch, and on an epoch boundary
def test_resume_equals_uninterrupted(tmp_path, every, stop_at):
    """Oracle: the uninterrupted run; exact (torch.equal on every parameter and buffer, equal losses).

    Dropout (global RNG) + BatchNorm (buffers) + shuffling + an augmentation drawing from the data
    generator. The resumed run starts from a differently initialised model and a reseeded global RNG,
    so everything must come from the checkpoint.
    """
    cfg = TrainConfig(steps=10, lr=1e-2, warmup_steps=2, batch_size=BATCH, log_every=1, seed=3)
    ref = _mlp(dropout=True)
    ref_result = fit(ref, _ce, _data(), cfg, augment=_jitter)

    ckpt = cfg.override(checkpoint_every=every, checkpoint_dir=str(tmp_path))

    def stop(step, *_):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(dropout=True), _ce, _data(), ckpt, augment=_jitter, callback=stop)
    torch.manual_seed(999)
    got = _mlp(seed=5, dropout=True)
    result = fit(got, _ce, _data(), ckpt, augment=_jitter)
    assert result.resumed_from == stop_at - 1
    assert result.losses == ref_result.losses and result.final_loss == ref_result.final_loss
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
    assert sorted(os.listdir(tmp_path)) == ["train_state.safetensors"]  # atomic: no temp files left


def test_resume_rejects_another_config_and_corrupt_files(tmp_path):
    """Oracle: the contract (one-line UserError naming the difference); no tolerance."""
    cfg = TrainConfig(steps=3, lr=1e-2, batch_size=BATCH, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    fit(_mlp(), _ce, _data(), cfg)
    with pytest.raises(UserError, match=r"different run \(lr 0.01 there, 0.02 here\)") as e:
        fit(_mlp(), _ce, _data(), cfg.override(lr=2e-2))
    assert "\n" not in str(e.value)
    path = tmp_path / "train_state.safetensors"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(UserError, match="corrupt") as e:
        fit(_mlp(), _ce, _data(), cfg)
    assert "\n" not in str(e.value)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="corrupt"):
        fit(_mlp(), _ce, _data(), cfg)


def test_ddp_two_processes_match_one(tmp_path):
    """Oracle: the same fit in one process with the same global batch of 7 (shares 4 / 3);
    tolerance: allclose(atol=1e-6, rtol=1e-5) (only the summation order of gradients differs).
    Also under DDP: interrupted + resumed == straight, exactly; a batch smaller than the world is refused.
    """
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed")
    worker = Path(__file__).with_name("train_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    straight, resumed = (
        load_file(str(tmp_path / "straight.safetensors")),
        load_file(str(tmp_path / "resumed.safetensors")),
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    one, result = train_worker.train()
    assert summary["world_size"] == 2 and result.world_size == 1
    for k, v in one.state_dict().items():
        assert torch.allclose(straight[k], v, atol=1e-6, rtol=1e-5), k
        assert torch.equal(resumed[k], straight[k]), k
    assert summary["resumed_from"] == 2 and summary["resumed_losses"] == summary["losses"]
    for (s2, l2), (s1, l1) in zip(summary["losses"], result.losses):  # losses: the global-batch mean
        assert s2 == s1 and math.isclose(l2, l1, rel_tol=1e-5, abs_tol=1e-6)
    assert "cannot be split over 2 processes" in summary["small_batch_error"]


def test_shares_cover_the_batch_and_scale_to_its_mean():
    """Oracle: arithmetic (contiguous shares, sizes differ by <= 1, sum of scale·mean = global mean); exact."""
    batch = Batch(torch.arange(7.0)[:, None], torch.arange(7))
    for world in (2, 3, 7):
        shares = [_share(batch, _Ranks(r, world)) for r in range(world)]
        rows = torch.cat([b.inputs for b, _ in shares])
        assert torch.equal(rows, batch.inputs)
        sizes = [len(b) for b, _ in shares]
        assert max(sizes) - min(sizes) <= 1
        mean = sum(scale * b.inputs.mean() for b, scale in shares) / world
        assert math.isclose(float(mean), 3.0, rel_tol=1e-6)
    with pytest.raises(UserError, match="cannot be split over 8 processes"):
        _share(batch, _Ranks(0, 8))


def test_trained_subset_leaves_the_rest_alone():
    """Oracle: the parameters before fit; exact (untouched tensors, restored requires_grad and mode)."""
    model = _mlp().eval()
    model[2].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    during = []

    def check(step, m, opt, loss):
        during.append((m.training, [p.requires_grad for p in m.parameters()]))

    cfg = TrainConfig(steps=3, lr=1e-2, batch_size=BATCH)
    fit(model, _ce, _data(), cfg, params=model[0].parameters(), callback=check)
    assert during[0] == (True, [True, True, False, False])
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    after = model.state_dict()
    assert torch.equal(after["2.weight"], before["2.weight"]) and torch.equal(
        after["2.bias"], before["2.bias"]
    )
    assert not torch.equal(after["0.weight"], before["0.weight"])


def test_bf16_autocast_is_close_to_fp32():
    """Oracle: the fp32 run; tolerance: rel 2e-2 on every step's loss (bf16 keeps 8 mantissa bits)."""
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=BATCH, log_every=1)
    ref = fit(_mlp(), _ce, _data(), cfg)
    got = fit(_mlp(), _ce, _data(), cfg.override(bf16=True))
    assert all(math.isfinite(v) for _, v in got.losses)
    assert all(math.isclose(a, b, rel_tol=2e-2) for (_, a), (_, b) in zip(got.losses, ref.losses))


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0), ("steps", 2.5), ("lr", 0.0), ("lr", "1e-4"), ("lr", float("nan")), ("optimizer", "lamb"),
        ("betas", (1.0, 0.9)), ("betas", (0.9,)), ("eps", 0), ("momentum", -0.1), ("weight_decay", -1.0),
        ("schedule", "step"), ("warmup_steps", -1), ("batch_size", 0), ("batch_size", True), ("grad_clip", 0.0),
        ("bf16", "yes"), ("seed", -1), ("log_every", 0), ("checkpoint_every", -1), ("checkpoint_every", 5),
    ],
)  # fmt: skip
def test_bad_config_values_name_the_field(field, value):
    """Oracle: the contract (ValueError whose message starts with the field); no tolerance."""
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value})
    name = "checkpoint_dir" if (field, value) == ("checkpoint_every", 5) else field
    assert str(e.value).startswith(f"{name}:") and "\n" not in str(e.value)


def test_override_skips_none_and_rejects_unknown_fields():
    """Oracle: dataclasses.replace semantics; exact."""
    cfg = TrainConfig().override(lr=3e-3, steps=None, grad_clip=None)
    assert cfg.lr == 3e-3 and cfg.steps == 1000 and cfg.grad_clip is None
    assert TrainConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="^stpes: not a TrainConfig field"):
        TrainConfig().override(stpes=3)
    with pytest.raises(ValueError, match="^lr:"):
        TrainConfig().override(lr=-1.0)


def _call(model, inputs):
    return model(inputs) if torch.is_tensor(inputs) else model(inputs["input_ids"])


def test_loss_helpers():
    """Oracles: F.cross_entropy / the KL and MSE formulas written out (per-sample mean over real tokens);
    tolerance: rel 1e-6 (float32). The teacher's train/eval mode is restored after each call.
    """
    torch.manual_seed(0)
    teacher, student = nn.Embedding(11, 13), nn.Embedding(11, 13)
    teacher.train()
    ids, mask = (
        torch.randint(0, 11, (3, 5)),
        torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]),
    )
    batch = Batch({"input_ids": ids, "attention_mask": mask})
    s, t = student(ids), teacher(ids).detach()
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1) * 4
    mse = (s - t).pow(2).mean(-1)
    per_sample = lambda x: ((x * mask).sum(1) / mask.sum(1)).mean()  # noqa: E731
    got_kl = distill_loss(teacher, _call, "causal_lm", temperature=2.0)(student, batch)
    assert math.isclose(got_kl.item(), per_sample(kl).item(), rel_tol=1e-6) and teacher.training
    got_mse = distill_loss(teacher, _call, "encoder")(student, batch)
    assert math.isclose(got_mse.item(), per_sample(mse).item(), rel_tol=1e-6)
    assert distill_loss(teacher, _call, "image")(teacher, Batch(ids[:, 0])).item() == 0.0  # KL(p ‖ p)
    labels = torch.tensor([1, 2, 3])
    img = Batch(ids[:, 0], labels)
    want = F.cross_entropy(student(ids[:, 0]), labels, label_smoothing=0.1)
    assert torch.equal(task_loss(_call, label_smoothing=0.1)(student, img), want)
    assert torch.equal(
        default_loss(teacher, _call, "image")(student, img), F.cross_entropy(student(ids[:, 0]), labels)
    )
    kl_t1 = distill_loss(teacher, _call, "causal_lm")(student, batch)
    assert torch.equal(default_loss(teacher, _call, "causal_lm")(student, batch), kl_t1)
    with pytest.raises(UserError, match="no labels and there is no teacher"):
        default_loss(None, _call, "image")(student, Batch(ids[:, 0]))
    with pytest.raises(ValueError, match="^kind:"):
        distill_loss(teacher, _call, "audio")
