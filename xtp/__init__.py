"""xtp: automatic tensor parallelism for PyTorch models on any accelerator.

``model = xtp.shard(model)`` under ``torchrun`` gives every rank only its slice of the model,
with outputs equal to the unsharded model's. ``print(xtp.plan(config, tp_size=4))`` shows what
would happen, without any weights. The layers behind these names are described in
docs/architecture.md.
"""

from __future__ import annotations

from ._version import __version__
from .distributed.context import TPContext
from .distributed.setup import init_distributed
from .errors import XtpError
from .loading.api import from_pretrained
from .loading.common import LoadReport, load_report
from .loading.offline import gather, preshard
from .loading.save import save_sharded
from .planning.api import plan
from .planning.spec import ShardPlan
from .sharding.api import shard
from .sharding.packing import pack_for_inference, unpack

__all__ = [
    "LoadReport", "ShardPlan", "TPContext", "XtpError", "__version__", "from_pretrained",
    "gather", "init_distributed", "load_report", "pack_for_inference", "plan", "preshard",
    "save_sharded", "shard", "unpack",
]
