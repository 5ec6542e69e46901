"""Reading the small JSON files xtp writes beside weights (pre-sharded metadata, training state)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError


def read_json_object(path: Path, damaged: str) -> dict:
    """The JSON object stored in ``path``.

    Raises:
        CheckpointError: the file cannot be read, is not JSON, or holds something other than an
            object; the message ends with ``damaged`` (what is damaged and what to do).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc}); {damaged}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; {damaged}")
    return data
