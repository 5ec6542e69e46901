"""xtp: automatic tensor parallelism for PyTorch models on any accelerator.

``model = xtp.shard(model)`` under ``torchrun`` gives every rank only its slice of the model,
with outputs equal to the unsharded model's. ``print(xtp.plan(config, tp_size=4))`` shows what
would happen, without any weights.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api_plan import plan  # noqa: E402
from .distributed import TPContext, init_distributed  # noqa: E402
from .errors import XtpError  # noqa: E402
from .export import gather, preshard  # noqa: E402, F401
from .load import from_pretrained, load_report  # noqa: E402, F401
from .packing import pack_for_inference, unpack  # noqa: E402, F401
from .plan import ShardPlan  # noqa: E402
from .presharded import save_sharded  # noqa: E402, F401
from .shard import shard  # noqa: E402

__all__ = ["ShardPlan", "TPContext", "XtpError", "__version__", "init_distributed", "plan", "shard"]
