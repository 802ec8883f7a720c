"""Per-layer diagnostics of a compressed folder (``edgecompress inspect DIR --sensitivity / --profile``):

* :mod:`.common` — folder checks, atomic writes, charts and the report.md "Diagnostics" section;
* :mod:`.sensitivity` — one quantizer group enabled at a time, ranked by the metric drop;
* :mod:`.profile` — ONNX Runtime's per-node profile mapped back to module names.
"""

from edgecompress.diagnostics.common import (  # noqa: F401
    ROOT,
    SECTION_END,
    SECTION_START,
    _write_outputs,
    check_folder,
    update_report,
)  # fmt: skip
from edgecompress.diagnostics.profile import module_of_scope, profile, profile_table  # noqa: F401
from edgecompress.diagnostics.sensitivity import _sensitivity_chart, sensitivity, sensitivity_table  # noqa: F401
