"""A larger English calibration set for the MiniLM pruning rows, disjoint from the built-in texts.

    python benchmarks/prune_calibset.py [OUT.txt]     # writes the file, prints the count

Paragraphs (8–80 words, the filter of :mod:`edgecompress.data.text`) of the docstrings of standard
library modules that are *not* among ``BUILTIN_MODULES``, of the classes and functions they define
and of those classes' methods, shuffled with seed 0; a paragraph that is also a built-in text (train or test) is dropped,
so the test texts stay unseen. Deterministic for a given Python version (3.11.7 here: 2982 texts,
21 words on average, about 30 times the tokens of the 310 built-in train texts). One text a line, for
``text:FILE`` specs; ``benchmarks/prune.py --calib-data stdlib`` (or ``text+stdlib``: the 310 built-in
train texts first) writes it to a temporary file.
"""

from __future__ import annotations

import importlib
import inspect
import random
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgecompress.data.text import BUILTIN_MODULES, _paragraphs, builtin_texts, load_texts  # noqa: E402

MODULES = (
    "abc", "ast", "asyncio", "base64", "binascii", "cmd", "code", "codecs", "colorsys",
    "concurrent.futures", "configparser", "contextlib", "copy", "copyreg", "dataclasses", "dis",
    "doctest", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "ftplib", "getopt",
    "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "hmac", "html", "html.parser",
    "http.cookies", "http.server", "imaplib", "inspect", "io", "ipaddress", "keyword", "linecache",
    "locale", "lzma", "mailbox", "mimetypes", "modulefinder", "multiprocessing", "netrc", "numbers",
    "operator", "optparse", "os", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "queue",
    "quopri", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "struct", "symtable", "sysconfig", "tabnanny",
    "tempfile", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser", "wsgiref.util",
    "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zipapp", "zipimport", "zoneinfo",
    "importlib", "unittest.mock", "email.parser", "email.headerregistry", "http.cookiejar",
    "logging.handlers", "json.decoder", "collections.abc", "asyncio.tasks", "asyncio.events",
    "asyncio.streams", "concurrent.futures.thread", "multiprocessing.pool", "ctypes", "pydoc", "pdb",
    "bdb", "cProfile", "profile", "pstats",
)  # fmt: skip


def _documented(mod) -> list:
    """The module, the classes and functions it defines (not imports), and those classes' methods."""
    objs = [mod]
    for name in sorted(dir(mod)):
        obj = getattr(mod, name, None)
        if name.startswith("_") or inspect.ismodule(obj) or getattr(obj, "__module__", None) != mod.__name__:
            continue
        objs.append(obj)
        if inspect.isclass(obj):
            objs += [getattr(v, "__func__", v) for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
    return objs


def stdlib_texts() -> list[str]:
    builtin = set(builtin_texts())
    seen: set[str] = set()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.re) warn on access
        for name in MODULES:
            if name in BUILTIN_MODULES:
                continue
            for obj in _documented(importlib.import_module(name)):
                doc = getattr(obj, "__doc__", None)
                for p in _paragraphs(doc) if isinstance(doc, str) else []:
                    if p not in seen and p not in builtin:
                        seen.add(p)
                        out.append(p)
    random.Random(0).shuffle(out)  # the first N texts are a sample of every module
    return out


SETS = ("text", "stdlib", "text+stdlib")  # ``benchmarks/prune.py --calib-data``


def spec(name: str, model: str = "minilm") -> str | None:
    """The data spec of calibration set ``name`` (None: the built-in train split; image models: always)."""
    if name == "text" or model != "minilm":
        return None
    path = write(None, with_train=name == "text+stdlib")
    return f"text:{path}"


def write(path: Path | None = None, with_train: bool = False) -> Path:
    """Write the set (one text a line) to ``path`` (default: a file in the temporary folder);
    ``with_train``: the built-in train texts first, then the set (``text+stdlib``)."""
    name = "edgecompress-calib-" + ("text+stdlib" if with_train else "stdlib") + ".txt"
    path = path or Path(tempfile.gettempdir()) / name
    texts = (load_texts("text", "train") if with_train else []) + stdlib_texts()
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    p = write(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"wrote {len(p.read_text(encoding='utf-8').splitlines())} texts to {p}")
