"""Recipes: YAML ⇄ an ordered list of passes, parsed strictly.

Unknown keys, unknown passes and mistyped fields are errors that name their path
(``passes[1].bits``) and suggest the closest valid name; a pass placed after one it cannot follow
is refused naming both (:func:`edgecompress.pipeline.check_order`); a pass entry's optional
``version`` must equal the pass's ``VERSION``. :func:`dump_recipe` writes the resolved recipe
(every default and version filled in); loading it back gives an equal :class:`Recipe`.

Sections: ``calibration`` and ``eval`` (data, samples, batch size), ``train`` (the training
data and the :class:`~edgecompress.train.TrainConfig` defaults of every training pass; a pass
field of the same name overrides it), ``export`` and ``bench`` (deployment after compression),
and ``device`` (``cpu`` or ``cuda``; the CLI's ``--device`` overrides it).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgecompress.errors import UserError
from edgecompress.pipeline import PASSES, check_order, load_builtin_passes

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # inside the package: a wheel ships them
DEVICES = ("cpu", "cuda")
SECTIONS = {
    "calibration": {"data": str, "samples": int, "batch_size": int, "seed": int},
    "eval": {"data": str, "samples": int, "batch_size": int},
    "export": {
        "format": Literal["onnx", "tensorrt"], "opset": int, "batch": int, "dynamic_batch": bool,
        "samples": int, "data": str, "weight_dtype": Literal["auto", "int8", "uint8"],
    },
    "bench": {
        "backend": Literal["torch", "onnxruntime", "tensorrt"], "batch": int, "seq": int, "threads": int,
        "seconds": float, "iterations": int,
    },
}  # fmt: skip
SECTION_DEFAULTS = {
    "calibration": {"data": None, "samples": 32, "batch_size": 32, "seed": 0},
    "eval": {"data": None, "samples": 0, "batch_size": 64},
    "export": {
        "format": "onnx",
        "opset": 20,
        "batch": 1,
        "dynamic_batch": False,
        "samples": 64,
        "data": None,
        "weight_dtype": "auto",
    },
    "bench": {
        "backend": "onnxruntime",
        "batch": 8,
        "seq": 128,
        "threads": 0,
        "seconds": 3.0,
        "iterations": 100,
    },
}
OPTIONAL_SECTIONS = ("train", "export", "bench")  # absent = that stage does not run / has no data
TOP_LEVEL = ("model", "device", "calibration", "eval", "passes", *OPTIONAL_SECTIONS)


def _train_section() -> tuple[dict, dict]:
    """The ``train:`` fields: data spec and sample count, then every TrainConfig field."""
    from edgecompress.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    spec = {"data": str, "samples": int}
    defaults: dict = {"data": None, "samples": 0}
    for f in dataclasses.fields(TrainConfig):
        spec[f.name], defaults[f.name] = hints[f.name], f.default
    return spec, defaults


SECTIONS["train"], SECTION_DEFAULTS["train"] = _train_section()


@dataclass
class Recipe:
    passes: list = field(default_factory=list)
    model: str | None = None
    device: str = "cpu"
    calibration: dict = field(default_factory=lambda: dict(SECTION_DEFAULTS["calibration"]))
    eval: dict = field(default_factory=lambda: dict(SECTION_DEFAULTS["eval"]))
    train: dict | None = None  # the training passes' data and TrainConfig defaults
    export: dict | None = None  # after compress: verified ONNX (or TensorRT engine) in the output folder
    bench: dict | None = None  # after compress: latency of baseline vs compressed on one backend


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(valid))})"


def _check_type(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, path)
            except UserError:
                continue
        raise UserError(f"{path}: {value!r} does not fit {tp}")
    if tp is type(None):
        if value is not None:
            raise UserError(f"{path}: expected null, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (typing.Any,)
        return tuple(_check_type(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise UserError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def parse_pass(entry: Any, path: str):
    """One ``passes[i]`` mapping → a pass instance, checked against the pass's dataclass fields."""
    if not isinstance(entry, dict) or "pass" not in entry:
        raise UserError(f"{path}: each pass must be a mapping with a 'pass' key")
    load_builtin_passes()
    name = entry["pass"]
    if name not in PASSES:
        raise UserError(f"{path}.pass: unknown pass {name!r}{_suggest(name, PASSES)}")
    cls = PASSES[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in entry.items():
        if key == "pass":
            continue
        if key == "version":
            if value != cls.VERSION:
                raise UserError(
                    f"{path}.version: the recipe is written for {name} version {value!r}; "
                    f"this edgecompress has version {cls.VERSION}"
                )
            continue
        if key not in fields:
            raise UserError(f"{path}.{key}: unknown field of pass {name!r}{_suggest(key, fields)}")
        kwargs[key] = _check_type(value, hints[key], f"{path}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: {e}") from None


def _parse_section(name: str, value: Any) -> dict:
    if value is None:
        return dict(SECTION_DEFAULTS[name])
    if not isinstance(value, dict):
        raise UserError(f"{name}: expected a mapping, got {value!r}")
    out = dict(SECTION_DEFAULTS[name])
    for key, v in value.items():
        spec = SECTIONS[name]
        if key not in spec:
            raise UserError(f"{name}.{key}: unknown field{_suggest(key, spec)}")
        out[key] = v if v is None else _check_type(v, spec[key], f"{name}.{key}")
    return out


def recipe_from_dict(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise UserError("recipe: the top level must be a mapping with a 'passes' list")
    for key in data:
        if key not in TOP_LEVEL:
            raise UserError(f"{key}: unknown recipe key{_suggest(key, TOP_LEVEL)}")
    passes = data.get("passes")
    if not isinstance(passes, list) or not passes:
        raise UserError("passes: a recipe needs a non-empty list of passes")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise UserError(f"model: expected a model spec string, got {model!r}")
    device = data.get("device") or "cpu"
    if device not in DEVICES:
        raise UserError(f"device: {device!r} is not one of {list(DEVICES)}")
    parsed = [parse_pass(p, f"passes[{i}]") for i, p in enumerate(passes)]
    check_order(parsed)
    recipe = Recipe(
        passes=parsed,
        model=model,
        device=device,
        calibration=_parse_section("calibration", data.get("calibration")),
        eval=_parse_section("eval", data.get("eval")),
        **{k: _parse_section(k, data[k]) for k in OPTIONAL_SECTIONS if data.get(k) is not None},
    )
    if recipe.train is not None:
        train_config(recipe.train)  # validates the values in one line
    return recipe


def train_config(section: dict):
    """The :class:`~edgecompress.train.TrainConfig` of a parsed ``train:`` section."""
    from edgecompress.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in section.items() if k in names})
    except (ValueError, TypeError) as e:
        raise UserError(f"train: {e}") from None


def resolve_recipe_path(path_or_name: str) -> Path:
    """A file path, or the name of a shipped recipe in ``recipes/`` (with or without ``.yaml``)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / path_or_name, RECIPES_DIR / f"{path_or_name}.yaml"):
        if cand.is_file():
            return cand
    shipped = sorted(f.stem for f in RECIPES_DIR.glob("*.yaml"))
    raise UserError(
        f"recipe {path_or_name!r} is neither a file nor a shipped recipe{_suggest(path_or_name, shipped)}"
    )


def load_yaml_text(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{source}:{where} malformed YAML ({getattr(e, 'problem', None) or e})") from None


def load_recipe(path_or_name: str, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or shipped recipe name), apply ``key.path=value`` overrides, validate."""
    path = resolve_recipe_path(path_or_name)
    data = load_yaml_text(path.read_text(), str(path))
    return recipe_from_dict(apply_overrides(data, overrides))


def apply_overrides(data: Any, overrides: typing.Sequence[str]) -> Any:
    """``passes.0.w_bits=6`` style overrides on the raw mapping (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        value = load_yaml_text(raw, f"--set {key}")
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            node = _step(node, part, ".".join(parts[: i + 1]), create=True)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise UserError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping or list")
    return data


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set {path}: no list item {part!r} (the list has {len(node)} items)")
    return int(part)


def _step(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise UserError(f"--set {path}: cannot descend into {node!r}")


def recipe_to_dict(recipe: Recipe) -> dict:
    out = {
        "model": recipe.model,
        "device": recipe.device,
        "calibration": dict(recipe.calibration),
        "eval": dict(recipe.eval),
        "passes": [
            {"pass": p.name, "version": p.VERSION, **_plain(dataclasses.asdict(p))} for p in recipe.passes
        ],
    }
    for key in OPTIONAL_SECTIONS:
        if getattr(recipe, key) is not None:
            out[key] = _plain(dict(getattr(recipe, key)))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
