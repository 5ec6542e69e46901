"""xtp: automatic tensor parallelism for PyTorch models on any accelerator.

``model = xtp.shard(model)`` under ``torchrun`` gives every rank only its slice of the model,
with outputs equal to the unsharded model's.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .distributed import TPContext, init_distributed  # noqa: E402
from .errors import XtpError  # noqa: E402

__all__ = ["TPContext", "XtpError", "__version__", "init_distributed"]
