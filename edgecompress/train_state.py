"""Training checkpoints without pickle: tensors in safetensors, everything else as a JSON skeleton.

:func:`flatten` splits a nested state (an optimizer's ``state_dict()``, say) into tensors and a
JSON-able skeleton that points to them; :func:`unflatten` inverts it. :func:`atomic_save` writes a
safetensors file through a temporary file renamed into place, so an interrupted write never
leaves a half file. Used by :func:`edgecompress.train.fit`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from edgecompress.errors import UserError

STATE_FORMAT = 1


def flatten(obj, key: str, out: dict[str, torch.Tensor]):
    """Tensors go to ``out`` under ``key``; the rest becomes a JSON skeleton that points to them."""
    if torch.is_tensor(obj):
        out[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, f"{key}.{k}", out)] for k, v in obj.items()]}
    if isinstance(obj, (tuple, list)):
        items = [flatten(v, f"{key}.{i}", out) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key}")


def unflatten(s, tensors: dict[str, torch.Tensor]):
    if isinstance(s, list):
        return [unflatten(v, tensors) for v in s]
    if isinstance(s, dict):
        if "__tensor__" in s:
            return tensors[s["__tensor__"]]
        if "__tuple__" in s:
            return tuple(unflatten(v, tensors) for v in s["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in s["__dict__"]}
    return s


def atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        info = {k: json.loads(meta[k]) for k in ("fingerprint", "optimizer", "scheduler", "losses", "run")}
        if info["run"]["format"] != STATE_FORMAT:
            raise ValueError(f"format {info['run']['format']}")
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(
            f"checkpoint {path} is corrupt or not a train state ({why}); delete it to start over"
        ) from None
    return info, tensors


def mismatch(saved: dict, now: dict) -> str:
    diff = [
        f"{k} {saved['config'].get(k)!r} there, {v!r} here"
        for k, v in now["config"].items()
        if saved["config"].get(k) != v
    ]
    if saved["params"] != now["params"]:
        diff.append("the trained parameters (names or shapes) differ")
    if saved["world_size"] != now["world_size"]:
        diff.append(f"world size {saved['world_size']} there, {now['world_size']} here")
    return "; ".join(diff)
