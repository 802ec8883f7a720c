"""Quantizer modules (log2/log√2, AdaLog, TanQ): oracle = the pure functions they wrap, exact."""

from __future__ import annotations

import torch

from edgecompress.quantize.log import fake_quant_adalog, fake_quant_logsqrt2
from edgecompress.quantize.log_modules import AdaLogQuantizer, LogQuantizer, TanQuantizer
from edgecompress.quantize.tan import fake_quant_tanq
from edgecompress.structure import SWAPS, class_path


def _x() -> torch.Tensor:
    return torch.rand(3, 97, generator=torch.Generator().manual_seed(0)) ** 2


def test_forward_equals_pure_functions():
    x = _x()
    ada = AdaLogQuantizer(4, "attn_probs").set_params(torch.tensor(0.9), 29)
    assert torch.equal(ada(x), fake_quant_adalog(x, torch.tensor(0.9), torch.tensor(29.0), 4))
    shifted = AdaLogQuantizer(4, "linear_in", shift=0.17).set_params(torch.tensor(2.0), 50)
    assert torch.equal(shifted(x), fake_quant_adalog(x + 0.17, torch.tensor(2.0), torch.tensor(50.0), 4))
    unfolded = AdaLogQuantizer(4, "linear_in", shift=0.17, fold_shift=False).set_params(torch.tensor(2.0), 50)
    assert torch.equal(unfolded(x), shifted(x) - 0.17)
    log = LogQuantizer(4, "logsqrt2").set_params(torch.tensor(0.8))
    assert torch.equal(log(x), fake_quant_logsqrt2(x, torch.tensor(0.8), 4))
    tan = TanQuantizer(4).set_params(torch.tensor(1.0), 0.93)
    assert torch.equal(
        tan(x), fake_quant_tanq(x, torch.tensor(1.0), torch.tensor(0.93, dtype=torch.float64), 4)
    )


def test_code_tables_reproduce_forward():
    # oracle: the exporter's form scale·table[code] must give the module's values
    x = _x()
    ada = AdaLogQuantizer(6).set_params(torch.tensor(0.9), 61)
    from edgecompress.quantize.log import quantize_adalog

    codes = quantize_adalog(x, ada.scale, ada.q, 6)
    torch.testing.assert_close(ada.scale * ada.code_table()[codes.long()], ada(x), rtol=1.2e-7, atol=1e-9)
    assert LogQuantizer(3, "log2").code_table().shape == (9,) and TanQuantizer(3).code_table().shape == (8,)


def test_swap_round_trip_and_state():
    # oracle: a module rebuilt from swap_config and loaded from the state dict computes the same
    x = _x()
    mods = [
        AdaLogQuantizer(4, "linear_in", shift=0.17).set_params(torch.tensor(2.0), 50),
        LogQuantizer(3, "log2", "attn_probs").set_params(torch.tensor(0.5)),
        TanQuantizer(5, "attn_probs").set_params(torch.tensor(1.0), 0.97),
    ]
    for m in mods:
        cls = SWAPS[class_path(type(m))]
        back = cls.from_swap(None, m.swap_config())
        back.load_state_dict(m.state_dict())
        assert torch.equal(back(x), m(x))


def test_describe_rows():
    ada = AdaLogQuantizer(4, "attn_probs").set_params(torch.tensor(1.0), 74)
    ada.stats = {"layer_sqnr_db": 20.0}
    row = ada.describe()
    assert row["quantizer"] == "adalog" and row["q"] == 74 and abs(row["log_base"] - 4.0) < 1e-3
    assert row["layer_sqnr_db"] == 20.0 and row["bits"] == 4
    tan = TanQuantizer(4).set_params(torch.tensor(1.0), 0.5).describe()
    assert tan["quantizer"] == "tanq" and abs(tan["end_slope"] - 1.571) < 1e-3  # απ/sin(απ) at α = ½
    assert LogQuantizer(4, "log2").describe()["quantizer"] == "log2"
