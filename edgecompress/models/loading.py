"""Model specs → models, all offline.

* ``timm:<arch>`` — any timm architecture; weights from ``checkpoint`` (safetensors) or the local
  Hugging Face cache (hub offline mode: never downloads). ``timm:<arch>?pretrained=false``
  asks for random weights explicitly; other ``?key=value`` pairs are passed to ``create_model``.
* ``hf:<dir>`` — a local transformers folder (encoders, ViT classifiers, causal LMs).
* ``demo:vit-digits``, ``demo:minilm`` — the built-in models (see :mod:`edgecompress.models.demo`).
* a folder written by ``edgecompress compress`` (has ``structure.json``).

Only safetensors files are read; pickle checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecompress.errors import UserError
from edgecompress.structure import load_tensors, read_structure, replay, structure_of

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".ckpt"}


def hub_offline() -> None:
    """Never touch the network for weights: Hugging Face Hub offline mode, also when already imported.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import; timm or transformers may have
    imported it before us, so the module constant is set too. Without this a missing cache entry
    costs ~30 s of HTTP retries before the error.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True


@dataclass
class LoadedModel:
    """A model plus what the rest of the pipeline needs to feed it and to rebuild it."""

    model: nn.Module
    spec: str
    kind: str  # "image" | "encoder" | "causal_lm"
    base: dict  # how to rebuild the architecture without weights (goes into structure.json)
    data_cfg: dict = field(default_factory=dict)  # image: input_size, mean, std, crop_pct
    tokenizer_dir: str | None = None

    def call(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Run ``model`` on a batch and return its main output tensor (logits or hidden states)."""
        if self.kind == "image":
            out = model(pixel_values=batch) if self.base["kind"] == "hf" else model(batch)
            return out.logits if hasattr(out, "logits") else out
        out = model(**batch)
        return out.logits if self.kind == "causal_lm" else out.last_hidden_state


def _refuse_pickle(path: Path) -> None:
    """One line for a missing file or a pickle checkpoint (by suffix or magic bytes)."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if path.suffix in PICKLE_SUFFIXES or head[:2] in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        raise UserError(f"{path} looks like a pickle checkpoint; edgecompress only loads .safetensors files")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _refuse_pickle(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a one-line error naming the first missing/unexpected/mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or extra or shaped:
        what = (
            f"missing {missing[0]!r}"
            if missing
            else f"unexpected {extra[0]!r}"
            if extra
            else f"shape of {shaped[0]!r}"
        )
        n = len(missing) + len(extra) + len(shaped)
        raise UserError(f"{source} does not fit the model: {what} ({n} mismatched tensors)")
    model.load_state_dict(state, strict=True)


def _check_safetensors_header(path: Path) -> None:
    """Cheap validity check (header only) so a corrupt shard gives one clear line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def _parse_query(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, query = spec.partition("?")
    opts: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        k, _, v = item.partition("=")
        opts[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
    return name, opts


@contextlib.contextmanager
def _seeded(active: bool, seed: int = 0):
    """Seed torch's RNG for a random initialisation without disturbing the caller's RNG stream."""
    if not active:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _timm(spec: str, checkpoint: str | None, random_init: bool) -> LoadedModel:
    import timm

    arch, opts = _parse_query(spec[len("timm:") :])
    pretrained = opts.pop("pretrained", True) and not random_init
    if arch not in timm.list_models() and arch.split(".")[0] not in timm.list_models():
        raise UserError(f"timm has no architecture {arch!r}")
    hub_offline()
    try:
        with _seeded(not pretrained):  # random weights are the same in every run (and every rank)
            model = timm.create_model(arch, pretrained=bool(pretrained and not checkpoint), **opts)
    except TypeError as e:
        raise UserError(f"timm:{arch}: bad option ({e})") from None
    except Exception as e:  # hub/cache errors come in many types
        raise UserError(
            f"timm:{arch}: no local pretrained weights ({type(e).__name__}); pass --checkpoint FILE.safetensors "
            f"or use 'timm:{arch}?pretrained=false' for random weights"
        ) from None
    if checkpoint:
        load_state(model, _read_safetensors(Path(checkpoint)), checkpoint)
    cfg = timm.data.resolve_data_config({}, model=model)
    data = {k: cfg[k] for k in ("input_size", "mean", "std", "crop_pct")}
    pe = getattr(model, "patch_embed", None)  # the built size wins over the pretrained config's
    if pe is not None and getattr(pe, "img_size", None) and hasattr(getattr(pe, "proj", None), "in_channels"):
        data["input_size"] = (pe.proj.in_channels, *pe.img_size)
    base = {"kind": "timm", "arch": arch, "kwargs": opts}
    return LoadedModel(model.eval(), spec, "image", base, data)


def _hf_kind(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    if any(a.endswith("ForImageClassification") for a in archs):
        return "image"
    return "encoder"


def _hf_auto(kind: str):
    import transformers as tf

    return {"causal_lm": tf.AutoModelForCausalLM, "image": tf.AutoModelForImageClassification}.get(
        kind, tf.AutoModel
    )


def _hf_image_cfg(folder: Path, config) -> dict:
    pre = folder / "preprocessor_config.json"
    p = json.loads(pre.read_text()) if pre.is_file() else {}
    size = getattr(config, "image_size", 224)
    return {
        "input_size": (getattr(config, "num_channels", 3), size, size),
        "mean": tuple(p.get("image_mean", (0.5, 0.5, 0.5))),
        "std": tuple(p.get("image_std", (0.5, 0.5, 0.5))),
        "crop_pct": 1.0,
    }


def _hf(spec: str, folder: Path, random_init: bool = False) -> LoadedModel:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to our own lines (errors are one line)
    if not (folder / "config.json").is_file():
        raise UserError(f"{spec}: {folder} is not a transformers model folder (no config.json)")
    hub_offline()
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    kind = _hf_kind(config)
    auto = _hf_auto(kind)
    weights = sorted(folder.glob("*.safetensors"))
    if random_init:
        if weights:  # asked for explicitly, but say so: the folder's trained weights are not used
            print(f"edgecompress: warning: --random-init: ignoring the weights in {folder}", file=sys.stderr)
        with _seeded(True):
            model = auto.from_config(config)
    elif not weights:
        has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
        why = (
            "only pickle weights (*.bin), which edgecompress refuses to load"
            if has_pickle
            else "no *.safetensors"
        )
        raise UserError(f"{spec}: {folder} has {why}")
    else:
        for w in weights:
            _check_safetensors_header(w)
        try:
            model = auto.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{spec}: cannot load weights ({str(e).splitlines()[0]})") from None
    tok = str(folder) if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file() else None
    base = {"kind": "hf", "config": config.to_dict(), "auto": auto.__name__}
    data = _hf_image_cfg(folder, config) if kind == "image" else {}
    return LoadedModel(model.eval(), spec, kind, base, data, tok)


def _demo(spec: str) -> LoadedModel:
    from edgecompress.models import demo

    name = spec[len("demo:") :]
    if name == "vit-digits":
        return LoadedModel(
            demo.load_vit_digits(), spec, "image", {"kind": "demo", "name": name}, dict(demo.VIT_DIGITS_DATA)
        )
    if name == "minilm":
        return _hf(spec, demo.minilm_dir())  # rebuilt like any hf model: from its saved config
    raise UserError(f"unknown demo model {spec!r} (choose demo:vit-digits or demo:minilm)")


def load_model(spec: str, checkpoint: str | None = None, random_init: bool = False) -> LoadedModel:
    """Load any model spec (see the module docstring). ``random_init`` only for timm/hf specs."""
    if spec.startswith("timm:"):
        loaded = _timm(spec, checkpoint, random_init)
    elif checkpoint:
        raise UserError("--checkpoint applies to timm: specs only")
    elif spec.startswith("hf:"):
        loaded = _hf(spec, Path(spec[3:]), random_init)
    elif spec.startswith("demo:"):
        loaded = _demo(spec)
    elif Path(spec).is_dir() and (Path(spec) / "structure.json").is_file():
        return load_structure_dir(Path(spec))
    else:
        raise UserError(
            f"unknown model spec {spec!r}: use timm:<arch>, hf:<dir>, demo:<name> or a compressed folder"
        )
    structure_of(loaded.model)["base"] = {
        **loaded.base,
        "spec": spec,
        "model_kind": loaded.kind,
        "data_cfg": loaded.data_cfg,
    }
    if loaded.tokenizer_dir:
        structure_of(loaded.model)["base"]["tokenizer_dir"] = loaded.tokenizer_dir
    return loaded


def _build_base(base: dict) -> nn.Module:
    kind = base.get("kind")
    if kind == "timm":
        import timm

        return timm.create_model(base["arch"], pretrained=False, **base.get("kwargs", {}))
    if kind == "demo" and base["name"] == "vit-digits":
        from edgecompress.models.demo import build_vit_digits

        return build_vit_digits()
    if kind == "hf":
        import transformers as tf

        cfg = dict(base["config"])
        config = tf.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        auto = getattr(tf, base.get("auto", "AutoModel"))
        return auto.from_config(config)
    raise UserError(f"structure.json: unknown base model kind {kind!r}")


def load_structure_dir(folder: Path) -> LoadedModel:
    """Rebuild a compressed model: base architecture + replayed ops + saved tensors (no pickle).

    ``structure.json``'s format, its passes' versions and every tensor's shape are checked first;
    replay imports only the modules that define the recorded classes and ops, never a pass.
    """
    from edgecompress.pipeline import check_pass_versions

    structure = read_structure(folder)
    check_pass_versions(structure["passes"], f"{folder}/structure.json")
    base = structure["base"]
    weights = folder / "model.safetensors"
    _read_safetensors_header(weights)  # clear error for missing / corrupt / pickle files
    model = _build_base(base)
    st = structure_of(model)
    st["base"], st["passes"] = base, list(structure["passes"])
    replay(model, structure["ops"])
    load_tensors(model, weights, structure.get("tensors"))
    loaded = LoadedModel(
        model.eval(), str(folder), base["model_kind"], base, dict(base.get("data_cfg") or {})
    )
    loaded.tokenizer_dir = base.get("tokenizer_dir")
    return loaded


def restore(out_dir: str | Path) -> nn.Module:
    """Rebuild a compressed model from a folder written by :func:`edgecompress.structure.save`."""
    return load_structure_dir(Path(out_dir)).model


def _read_safetensors_header(path: Path) -> None:
    _refuse_pickle(path)
    _check_safetensors_header(path)
