"""Every ``XTP_*`` environment variable ``xtp.accelerators`` reads: its name and its parser.

One function per variable, each reading the environment when called (never at import), so a
variable is parsed in one place whoever needs it. A value that cannot be used raises
:class:`~xtp.accelerators.errors.EnvSettingError` (a ``ValueError`` and an ``AcceleratorError``)
naming the variable and the values that work; the xtp core turns it into its own error type
where it needs one (``xtp.init_distributed`` raises ``DistributedSetupError`` for
``XTP_TIMEOUT``).

=========================== ==================================================================
``XTP_ACCELERATOR``         accelerator to select (strict: no silent fallback)
``XTP_DIST_BACKEND``        collective backend instead of the accelerator's default; also
                            switches the CPU shared-memory path off
``XTP_DISABLE_PLUGINS``     anything but ``0``: ignore accelerator plugins
``XTP_TIMEOUT``             seconds a collective waits for its peers (default 300)
``XTP_CPU_SHM``             ``0``/``false``/``off``/``no``: no shared-memory collectives on CPU
``XTP_CPU_SHM_CHUNK_BYTES`` bytes per rank per shared-memory buffer (default 1 MiB)
``XTP_CPU_PACK``            CPU inference packing: ``1`` (default), ``all``, ``kernel``,
                            ``kernel-rows`` or ``0``
``XTP_CPU_GEMV_THREADS``    most threads per rank xtp's GEMV kernel serves (more: torch's paths)
``XTP_CPU_GEMV_TEAM``       ``0``/``false``/``off``/``no``: the kernel splits products on its own
                            pool, not on torch's OpenMP threads (default where found)
``XTP_CPU_GEMV_SPLIT``      threads (or ``cores``) the kernel splits each product across on its
                            own pool, whatever torch's thread count
``XTP_CPU_GEMV_ROWS``       most input rows the kernel serves (default 16; more: ``F.linear``)
``XTP_NUM_THREADS``         intra-op threads per CPU rank (default: cores / local ranks)
``XTP_CROSS_NODE_TP``       ``1``/``true``/``on``/``yes``: let a TP group span nodes (slow)
``XTP_PIN``                 CPU ranks on their own cores: unset (``xtp run``/``bench`` pin the
                            ranks they start, ``torchrun`` ranks are left alone), ``1``
                            (pin, also under ``torchrun``), ``smt`` (pin, SMT siblings too),
                            ``0`` (never pin)
=========================== ==================================================================
"""

from __future__ import annotations

import os
from typing import Literal

from .errors import EnvSettingError

ENV_ACCELERATOR = "XTP_ACCELERATOR"
ENV_DIST_BACKEND = "XTP_DIST_BACKEND"
ENV_DISABLE_PLUGINS = "XTP_DISABLE_PLUGINS"
ENV_TIMEOUT = "XTP_TIMEOUT"
ENV_CPU_SHM = "XTP_CPU_SHM"
ENV_CHUNK_BYTES = "XTP_CPU_SHM_CHUNK_BYTES"
ENV_CPU_PACK = "XTP_CPU_PACK"
ENV_NUM_THREADS = "XTP_NUM_THREADS"
ENV_CROSS_NODE_TP = "XTP_CROSS_NODE_TP"
ENV_PIN = "XTP_PIN"
ENV_GEMV_THREADS = "XTP_CPU_GEMV_THREADS"
ENV_GEMV_TEAM = "XTP_CPU_GEMV_TEAM"
ENV_GEMV_SPLIT = "XTP_CPU_GEMV_SPLIT"
ENV_GEMV_ROWS = "XTP_CPU_GEMV_ROWS"

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CHUNK_BYTES = 1 << 20

_FALSE = frozenset({"0", "false", "off", "no"})
_PACK_OFF = _FALSE
_PACK_ON = frozenset({"", "1", "true", "on", "yes"})
_PACK_ALL = frozenset({"all"})


def _stripped(name: str) -> str:
    return os.environ.get(name, "").strip()


def _positive_int(name: str, hint: str) -> int | None:
    """Variable ``name`` as a positive integer, ``None`` when unset or empty; EnvSettingError
    (with ``hint`` appended) otherwise."""
    raw = _stripped(name)
    if not raw:
        return None
    # isascii: str.isdigit also accepts digits int() refuses ("²")
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise EnvSettingError(f"{name}={raw!r} must be a positive integer{hint}")
    return int(raw)


def accelerator_name() -> str | None:
    """``XTP_ACCELERATOR`` as set (stripped), or ``None`` when unset or empty."""
    return _stripped(ENV_ACCELERATOR) or None


def dist_backend() -> str | None:
    """``XTP_DIST_BACKEND`` as set (stripped), or ``None`` when unset or empty."""
    return _stripped(ENV_DIST_BACKEND) or None


def plugins_disabled() -> bool:
    """Whether ``XTP_DISABLE_PLUGINS`` is set to anything but empty or ``0``."""
    return _stripped(ENV_DISABLE_PLUGINS) not in ("", "0")


def timeout_seconds() -> float:
    """``XTP_TIMEOUT`` in seconds (> 0), or 300 when unset or empty.

    Raises:
        EnvSettingError: the value is not a number, or not positive.
    """
    raw = _stripped(ENV_TIMEOUT)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        raise EnvSettingError(
            f"{ENV_TIMEOUT}={raw!r} is not a number of seconds; set e.g. {ENV_TIMEOUT}=120"
        ) from None
    if not seconds > 0:
        raise EnvSettingError(f"{ENV_TIMEOUT} must be positive, got {raw!r}")
    return seconds


def cpu_shm_switched_off() -> str | None:
    """The value of ``XTP_CPU_SHM`` (as set) when it switches the shared-memory path off
    (``0``, ``false``, ``off``, ``no``, any case), else ``None``."""
    if _stripped(ENV_CPU_SHM).lower() in _FALSE:
        return os.environ[ENV_CPU_SHM]
    return None


def shm_chunk_bytes() -> int:
    """``XTP_CPU_SHM_CHUNK_BYTES``, or 1 MiB when unset or empty (not yet checked or rounded:
    that is the caller's, for an argument and the variable alike).

    Raises:
        EnvSettingError: the value is not an integer.
    """
    raw = _stripped(ENV_CHUNK_BYTES)
    try:
        return int(raw) if raw else DEFAULT_CHUNK_BYTES
    except ValueError:
        raise EnvSettingError(f"{ENV_CHUNK_BYTES}={raw!r} is not a number of bytes") from None


def cpu_pack() -> Literal["on", "off", "all", "kernel", "kernel-rows"]:
    """What ``XTP_CPU_PACK`` asks for: ``"on"`` (unset, ``1``, ``true``, ``on``, ``yes``: each
    dtype in its default layout), ``"all"`` (every dtype in oneDNN's layout), ``"kernel"``
    (fp32 and bf16 in the GEMV kernel's layouts, on CPUs with AMX too), ``"kernel-rows"`` (the
    same, bf16 kept as plain rows: an experiment, see ``gemv.Bf16RowsLinear``) or ``"off"``
    (``0``, ``false``, ``off``, ``no``: no packing).

    Raises:
        EnvSettingError: any other value.
    """
    value = os.environ.get(ENV_CPU_PACK, "1").strip().lower()
    if value in _PACK_OFF:
        return "off"
    if value in _PACK_ON:
        return "on"
    if value in _PACK_ALL:
        return "all"
    if value in ("kernel", "kernel-rows"):
        return value
    raise EnvSettingError(
        f"{ENV_CPU_PACK}={os.environ[ENV_CPU_PACK]!r} is not understood; use 1 (the default: "
        "fp32 and bf16 through xtp's GEMV kernel, fp16 packed for oneDNN), all (every dtype "
        "packed for oneDNN), kernel (bf16 through the kernel on AMX CPUs too), kernel-rows "
        "(the same with bf16 weights kept as plain rows) or 0 (no packing)")


def num_threads() -> int | None:
    """``XTP_NUM_THREADS`` (a positive integer), or ``None`` when unset or empty.

    Raises:
        EnvSettingError: the value is not a positive integer.
    """
    return _positive_int(ENV_NUM_THREADS, "")


def cross_node_tp() -> bool:
    """Whether ``XTP_CROSS_NODE_TP`` lets a TP group span nodes: ``1``/``true``/``on``/``yes``
    (any case) yes; unset, empty, ``0``/``false``/``off``/``no`` no.

    Raises:
        EnvSettingError: any other value.
    """
    value = _stripped(ENV_CROSS_NODE_TP).lower()
    if value in _FALSE or not value:
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    raise EnvSettingError(
        f"{ENV_CROSS_NODE_TP}={os.environ[ENV_CROSS_NODE_TP]!r} is not understood; use 1 to let "
        "a TP group span nodes (slow: docs/topology.md) or 0 (the default: tp inside a node)")


def pin_mode() -> Literal["auto", "on", "smt", "off"]:
    """What ``XTP_PIN`` asks for: ``"auto"`` (unset or empty: xtp's own launchers pin the ranks
    they start, nothing else is pinned), ``"on"`` (``1``/``true``/``on``/``yes``: pin, also the
    ranks of a user's ``torchrun``, in ``xtp.init_distributed``), ``"smt"`` (pin, each rank on
    every SMT sibling of its cores) or ``"off"`` (``0``/``false``/``off``/``no``: never pin).

    Raises:
        EnvSettingError: any other value.
    """
    value = _stripped(ENV_PIN).lower()
    if not value:
        return "auto"
    if value in _FALSE:
        return "off"
    if value in ("1", "true", "on", "yes"):
        return "on"
    if value == "smt":
        return "smt"
    raise EnvSettingError(
        f"{ENV_PIN}={os.environ[ENV_PIN]!r} is not understood; use 1 (pin each CPU rank to its "
        "own physical cores, also under torchrun), smt (the same with SMT siblings), 0 (never "
        "pin) or leave it unset (xtp run/bench pin the ranks they start)")


def setting(name: str) -> str:
    """``"NAME=value"`` as the environment has it (for messages)."""
    return f"{name}={os.environ.get(name)}"


def gemv_threads() -> int | None:
    """``XTP_CPU_GEMV_THREADS``: ranks computing with more threads than this use torch's
    parallel matmuls instead of xtp's GEMV kernel, for every dtype (``1``: the kernel serves
    one-thread ranks only); ``None`` when unset or empty (the kernel's own default: fp32 on
    one-thread ranks, bf16 on any thread count where products run on torch's OpenMP team).

    Raises:
        EnvSettingError: the value is not a positive integer.
    """
    return _positive_int(ENV_GEMV_THREADS, " (the most threads per rank the GEMV kernel "
                                           "serves; 1: one-thread ranks only)")


def gemv_team() -> bool:
    """``XTP_CPU_GEMV_TEAM``: whether xtp's GEMV kernel splits a product across torch's own
    OpenMP threads (unset, ``1``, ``true``, ``on``, ``yes``: where torch's OpenMP runtime is
    found; then bf16 ranks of several threads use the kernel by default) or across the
    kernel's own thread pool (``0``, ``false``, ``off``, ``no``: bf16 ranks of several threads
    then stay on oneDNN unless ``XTP_CPU_GEMV_THREADS`` says otherwise).

    Raises:
        EnvSettingError: any other value.
    """
    raw = _stripped(ENV_GEMV_TEAM).lower()
    if raw in _PACK_ON or raw in _FALSE:
        return raw not in _FALSE
    raise EnvSettingError(f"{ENV_GEMV_TEAM}={os.environ[ENV_GEMV_TEAM]!r} is not on or off; set "
                          f"{ENV_GEMV_TEAM}=1 (torch's OpenMP threads) or 0 (the kernel's own "
                          "threads)")


def gemv_split() -> int | Literal["cores"] | None:
    """``XTP_CPU_GEMV_SPLIT``: the threads xtp's GEMV kernel splits each product it serves
    across on its own pool, whatever torch's thread count (for ranks whose torch ops run on one
    thread, ``XTP_NUM_THREADS=1``): a positive integer, or ``cores`` (as many as the CPUs this
    process may run on); ``None`` when unset or empty.

    Raises:
        EnvSettingError: any other value.
    """
    raw = _stripped(ENV_GEMV_SPLIT).lower()
    if raw == "cores":
        return "cores"
    return _positive_int(ENV_GEMV_SPLIT, " (threads per product, or 'cores')")


def gemv_rows() -> int | None:
    """``XTP_CPU_GEMV_ROWS``: inputs with more rows than this go to ``F.linear`` instead of xtp's
    GEMV kernel (batched decode, prefill); ``None`` when unset or empty (the kernel's default).

    Raises:
        EnvSettingError: the value is not a positive integer.
    """
    return _positive_int(ENV_GEMV_ROWS, " (the most input rows the GEMV kernel serves)")
