"""Recipes: strict parsing, suggestions, overrides, round trip (oracle: equality of Recipe objects)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecompress.errors import UserError
from edgecompress.pipeline import PASSES, load_builtin_passes
from edgecompress.recipe import (
    RECIPES_DIR,
    Recipe,
    dump_recipe,
    load_recipe,
    load_yaml_text,
    recipe_from_dict,
)


def _roundtrip(recipe: Recipe) -> Recipe:
    return recipe_from_dict(load_yaml_text(dump_recipe(recipe), "dump"))


def test_every_registered_pass_roundtrips_with_defaults():
    load_builtin_passes()
    assert "uniform_ptq" in PASSES
    for name, cls in PASSES.items():  # a pass with required fields names an example of them
        r = recipe_from_dict({"passes": [{"pass": name, **getattr(cls, "EXAMPLE", {})}]})
        assert _roundtrip(r) == r, name


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses_and_roundtrips(path: Path):
    r = load_recipe(str(path))
    assert r.passes
    assert _roundtrip(r) == r


def test_non_default_values_survive_roundtrip():
    r = recipe_from_dict(
        {
            "passes": [
                {"pass": "uniform_ptq", "w_bits": 4, "a_bits": 6, "observer": "mse", "ignore": ["re:head"]}
            ]
        }
    )
    back = _roundtrip(r)
    assert back.passes[0].w_bits == 4 and back.passes[0].a_bits == 6
    assert back.passes[0].ignore == ("re:head",)


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"passes": [{"pass": "uniform_ptqq"}]},
            "passes[0].pass: unknown pass 'uniform_ptqq' (did you mean 'uniform_ptq'?)",
        ),
        (
            {"passes": [{"pass": "uniform_ptq", "wbits": 4}]},
            "passes[0].wbits: unknown field of pass 'uniform_ptq' (did you mean 'w_bits'?)",
        ),
        (
            {"passes": [{"pass": "uniform_ptq", "w_bits": "four"}]},
            "passes[0].w_bits: expected int, got 'four'",
        ),
        ({"passes": [{"pass": "uniform_ptq", "w_bits": True}]}, "passes[0].w_bits: expected int, got True"),
        ({"passes": [{"pass": "uniform_ptq", "observer": "max"}]}, "passes[0].observer: 'max' is not one of"),
        ({"passes": [{"pass": "uniform_ptq", "w_bits": 12}]}, "passes[0]: w_bits must be in [2, 8], got 12"),
        ({"passes": []}, "passes: a recipe needs a non-empty list of passes"),
        ({"pases": []}, "pases: unknown recipe key (did you mean 'passes'?)"),
        (
            {"passes": [{"pass": "uniform_ptq"}], "calibration": {"sample": 3}},
            "calibration.sample: unknown field (did you mean 'samples'?)",
        ),
        (["not", "a", "mapping"], "recipe: the top level must be a mapping"),
    ],
)
def test_bad_recipes_name_the_path(data, message):
    with pytest.raises(UserError) as e:
        recipe_from_dict(data)
    assert str(e.value).startswith(message)


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("passes:\n  - pass: uniform_ptq\n    w_bits: [8\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+ malformed YAML"):
        load_recipe(str(p))


def test_set_overrides_are_revalidated():
    r = load_recipe("uniform_w8a8", ["passes.0.w_bits=6", "calibration.samples=16"])
    assert r.passes[0].w_bits == 6 and r.calibration["samples"] == 16
    with pytest.raises(UserError, match=r"passes\[0\].w_bits: expected int"):
        load_recipe("uniform_w8a8", ["passes.0.w_bits=abc"])
    with pytest.raises(UserError, match="no list item '3'"):
        load_recipe("uniform_w8a8", ["passes.3.w_bits=4"])
    with pytest.raises(UserError, match="expected key.path=value"):
        load_recipe("uniform_w8a8", ["passes.0.w_bits"])


def test_unknown_recipe_name_suggests():
    with pytest.raises(UserError, match="did you mean 'uniform_w8a8'"):
        load_recipe("uniform_w8a9")
