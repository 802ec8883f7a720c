"""Text data, offline: a built-in English set from the Python standard library's docstrings, or a file.

The built-in set is deterministic for a given Python version, whatever the process imported before:
paragraphs of the docstrings of a fixed list of modules and of the classes and functions they
define (not of their submodules), kept when they have 8–80 words, shuffled with seed 0; ``train``
is the first half and ``test`` the second.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from pathlib import Path

from edgecompress.errors import UserError

BUILTIN_MODULES = (
    "argparse", "collections", "csv", "datetime", "functools", "itertools", "json", "logging",
    "pathlib", "random", "re", "shutil", "statistics", "string", "textwrap", "threading", "unittest",
    "urllib.parse", "zipfile", "heapq", "bisect", "fractions", "decimal", "difflib", "email.message",
    "http.client", "subprocess", "tarfile", "calendar", "pprint",
)  # fmt: skip


def _paragraphs(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        text = " ".join(para.split())
        if 8 <= len(text.split()) <= 80 and not re.search(r"[>]{3}|::|\|", text):
            out.append(text)
    return out


def builtin_texts() -> list[str]:
    seen, texts = set(), []
    for name in BUILTIN_MODULES:
        mod = importlib.import_module(name)
        attrs = [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        # submodules are skipped: whether ``logging.handlers`` is an attribute of ``logging`` depends
        # on what the process imported before, and the set must not
        objs = [mod] + [a for a in attrs if not inspect.ismodule(a)]
        for obj in objs:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and (obj is mod or getattr(obj, "__module__", None) == mod.__name__):
                for p in _paragraphs(doc):
                    if p not in seen:
                        seen.add(p)
                        texts.append(p)
    random.Random(0).shuffle(texts)
    return texts


def load_texts(spec: str, split: str) -> list[str]:
    """``text`` (built-in, split in halves) or ``text:FILE`` (one text per non-empty line, no split)."""
    if spec == "text":
        texts = builtin_texts()
        half = len(texts) // 2
        return texts[:half] if split == "train" else texts[half:]
    path = Path(spec[len("text:") :])
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    texts = [ln for ln in lines if ln]
    if not texts:
        raise UserError(f"{path} contains no text")
    return texts
