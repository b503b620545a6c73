"""Places where the crash tests stop a real run so they can kill it at a known point.

The resume tests must kill a run at exact points (half-way through writing an artifact, in
the middle of an update). With GRPOFLOW_PAUSE_AT set, the first pause point whose label
contains that text writes its label to the file GRPOFLOW_PAUSE_MARKER and waits there to be
killed, so the test can SIGKILL the process at a known place. Unset, it costs one dictionary
lookup. Nothing else in grpoflow reads these variables.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT_ENV = "GRPOFLOW_PAUSE_AT"
PAUSE_MARKER_ENV = "GRPOFLOW_PAUSE_MARKER"


def pause_point(label: str) -> None:
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted or wanted not in label:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:  # renamed into place: a test that sees the marker can read the label at once
        Path(marker + ".tmp").write_text(label)
        os.replace(marker + ".tmp", marker)
    time.sleep(600)
    raise RuntimeError(f"paused at '{label}' ({PAUSE_AT_ENV}) for 600 s and was not killed")
