"""xtp: automatic tensor parallelism for PyTorch models on any accelerator.

``model = xtp.shard(model)`` under ``torchrun`` gives every rank only its slice of the model,
with outputs equal to the unsharded model's. ``print(xtp.plan(config, tp_size=4))`` shows what
would happen, without any weights.
"""

from __future__ import annotations

from ._version import __version__
from .distributed.setup import TPContext, init_distributed  # noqa: E402
from .errors import XtpError  # noqa: E402
from .loading.api import from_pretrained, load_report  # noqa: E402, F401
from .loading.offline import gather, preshard  # noqa: E402, F401
from .loading.presharded import save_sharded  # noqa: E402, F401
from .planning.api import plan  # noqa: E402
from .planning.spec import ShardPlan  # noqa: E402
from .sharding.api import shard  # noqa: E402
from .sharding.packing import pack_for_inference, unpack  # noqa: E402, F401

__all__ = ["ShardPlan", "TPContext", "XtpError", "__version__", "init_distributed", "plan", "shard"]
