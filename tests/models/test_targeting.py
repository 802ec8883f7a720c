"""Targeting language and module swaps (oracle: the module names we expect, exactly)."""

from __future__ import annotations

import pytest
from torch import nn

from edgecompress.errors import UserError
from edgecompress.models.slots import SlotLinear
from edgecompress.models.targeting import select_modules
from edgecompress.structure import replace_module, structure_of


def _net():
    return nn.Sequential(
        nn.Linear(4, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), nn.Linear(8, 2)
    )


def test_select_by_class_name_regex_and_ignore():
    m = _net()
    assert [n for n, _ in select_modules(m, ["Linear"])] == ["0", "2.0", "3"]
    assert [n for n, _ in select_modules(m, ["re:2\\..*"])] == ["2.0", "2.1"]
    assert [n for n, _ in select_modules(m, ["Linear"], ["3"])] == ["0", "2.0"]
    assert [n for n, _ in select_modules(m, ["2.1"])] == ["2.1"]
    assert [n for n, _ in select_modules(m, ["Module"], ["re:.*"])] == []


def test_bad_regex_is_a_user_error():
    with pytest.raises(UserError, match="invalid regular expression"):
        select_modules(_net(), ["re:("])


def test_replace_module_records_the_swap_by_import_path():
    m = _net()
    replace_module(m, "0", SlotLinear.adopt(m[0]))
    assert isinstance(m[0], SlotLinear)
    assert structure_of(m)["ops"] == [
        {
            "op": "swap", "name": "0", "cls": "edgecompress.models.slots.SlotLinear", "version": 1,
            "config": {"in_features": 4, "out_features": 8, "bias": True}, "module": "edgecompress.structure",
        }
    ]  # fmt: skip
    assert [n for n, _ in select_modules(m, ["Linear"])] == ["0", "2.0", "3"]  # still a Linear
    with pytest.raises(TypeError, match="not a registered swap class"):
        replace_module(m, "3", nn.Linear(8, 2))
