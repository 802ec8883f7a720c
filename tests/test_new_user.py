"""What a new user hits first (issue 11's smaller defects), each on a model the rest of the suite
does not use. Oracles: exact strings, equal tensors, file modes from the umask, token-id bounds."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from edgecompress import __version__
from edgecompress.cli import main
from edgecompress.models.loading import load_model
from tests.conftest import save_tiny_llama

VIT_S = "timm:vit_small_patch16_224?pretrained=false&img_size=32&patch_size=8&depth=2&num_classes=10"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"edgecompress {__version__}"


def test_random_weights_are_the_same_every_time_and_leave_the_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = load_model(VIT_S), load_model(VIT_S)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_output_folder_is_readable_as_the_umask_says(tmp_path):
    out = tmp_path / "run"
    assert main(["compress", "--model", VIT_S, "--out", str(out), "--set", "calibration.samples=4",
                 "--set", "eval.samples=8", "--no-export"]) == 0  # fmt: skip
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_random_init_on_a_folder_with_weights_says_so(tiny_bert_dir, capsys):
    loaded = load_model(f"hf:{tiny_bert_dir}", random_init=True)
    assert loaded.model is not None
    err = capsys.readouterr().err
    assert f"--random-init: ignoring the weights in {tiny_bert_dir}" in err


@pytest.fixture(scope="module")
def llama_vocab_500(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama500"), vocab_size=500, num_hidden_layers=1)


def test_bench_feeds_token_ids_the_vocabulary_has(llama_vocab_500, tmp_path, capsys):
    from edgecompress.bench.backends import feeds_for, vocab_size
    from edgecompress.export.onnx import export_onnx
    from edgecompress.export.runtime import ort_session

    path = export_onnx(load_model(f"hf:{llama_vocab_500}"), tmp_path / "l.onnx", batch=2).path
    assert vocab_size(path) == 500
    feeds = feeds_for(ort_session(path, 1), 2, 16, vocab=500)
    assert int(feeds["input_ids"].max()) < 500
    argv = ["bench", str(path), "--backend", "onnxruntime", "--batch", "2", "--seq", "16",
            "--seconds", "0.1", "--iterations", "3"]  # fmt: skip
    assert main(argv) == 0 and "median" in capsys.readouterr().out
