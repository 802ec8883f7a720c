"""edgecompress: compress trained transformers with one YAML recipe of published methods.

Public API::

    loaded = load_model("demo:vit-digits")
    recipe = load_recipe("uniform_w8a8")
    model, records = run(loaded.model, recipe.passes, ctx)
    save(model, "out/", {...}); model = restore("out/")
"""

from edgecompress.errors import UserError
from edgecompress.models.loading import load_model, restore
from edgecompress.pipeline import PASSES, Context, register_pass, run
from edgecompress.recipe import load_recipe
from edgecompress.structure import save

__all__ = [
    "PASSES",
    "Context",
    "UserError",
    "load_model",
    "load_recipe",
    "register_pass",
    "restore",
    "run",
    "save",
]
__version__ = "0.1.0"
