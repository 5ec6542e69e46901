"""xtp's accelerator registry: devices and collectives for CUDA, XPU, HPU, CPU and plugins.

Installed as ``xtp.accelerators``; it never imports the xtp core. Typical use::

    from xtp.accelerators import get_accelerator
    acc = get_accelerator()          # argument > XTP_ACCELERATOR > plugins > auto-detect
    backend = resolve_dist_backend(acc)
"""

from .comm.autograd import copy_to_group, gather_from_group, reduce_from_group, scatter_to_group
from .comm.base import Communicator, TorchCommunicator
from .comm.counting import CollectiveRecord, CountingCommunicator
from .comm.solo import SoloCommunicator
from .cpu.shm import CollectiveMismatchError, ShmCommunicator, create_cpu_communicator
from .cpu.threads import apply_threads, threads_per_rank
from .devices.backend import resolve_dist_backend
from .devices.base import Accelerator, Availability
from .devices.registry import (
    BUILTINS,
    DETECTION_ORDER,
    PLUGIN_GROUP,
    AcceleratorSelectionWarning,
    Selection,
    create,
    get_accelerator,
    known_names,
    plugins,
    reset_accelerator,
    select,
)
from .env import ENV_ACCELERATOR, ENV_DIST_BACKEND
from .errors import (
    AcceleratorError,
    AcceleratorUnavailableError,
    BackendUnavailableError,
    CollectiveError,
    CollectiveTimeoutError,
    EnvSettingError,
    UnknownAcceleratorError,
    XtpError,
)

__all__ = [
    "Accelerator", "Availability", "AcceleratorError", "AcceleratorSelectionWarning",
    "AcceleratorUnavailableError", "BackendUnavailableError", "BUILTINS", "CollectiveError",
    "CollectiveMismatchError", "CollectiveRecord", "CollectiveTimeoutError", "Communicator",
    "CountingCommunicator", "DETECTION_ORDER", "ENV_ACCELERATOR", "ENV_DIST_BACKEND",
    "EnvSettingError", "PLUGIN_GROUP", "Selection", "ShmCommunicator", "SoloCommunicator",
    "TorchCommunicator", "UnknownAcceleratorError",
    "XtpError", "apply_threads", "copy_to_group", "create", "create_cpu_communicator",
    "gather_from_group", "get_accelerator", "known_names", "plugins", "reduce_from_group",
    "reset_accelerator", "resolve_dist_backend", "scatter_to_group", "select", "threads_per_rank",
]
