"""Selecting the accelerator: explicit argument > XTP_ACCELERATOR > plugins > auto-detection.

* ``XTP_ACCELERATOR`` is strict: an unknown name, or one whose hardware or software is missing,
  raises with the reason and the fix; there is never a silent fallback.
* Third-party accelerators register through the entry-point group ``xtp.accelerators``; each
  entry point loads to an :class:`Accelerator` subclass (or a zero-argument factory). A plugin
  that fails to load is reported with a warning and skipped, unless it is the one selected.
* Auto-detection asks plugins first, then the built-ins in :data:`DETECTION_ORDER`; it warns
  when more than one non-CPU accelerator is present.

The selection is cached per process; :func:`reset_accelerator` clears it (for tests).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

from ..env import ENV_ACCELERATOR, accelerator_name, plugins_disabled
from ..errors import AcceleratorError, AcceleratorUnavailableError, UnknownAcceleratorError
from .base import Accelerator

PLUGIN_GROUP = "xtp.accelerators"

#: built-in name -> "module:Class", relative to this package (imported on first use)
BUILTINS: dict[str, str] = {
    "cuda": "cuda:CudaAccelerator",
    "xpu": "xpu:XpuAccelerator",
    "hpu": "hpu:HpuAccelerator",
    "cpu": "cpu:CpuAccelerator",
}
#: auto-detection order of the built-ins (HPU first: Gaudi stacks ship CUDA-migration shims)
DETECTION_ORDER: tuple[str, ...] = ("hpu", "cuda", "xpu", "cpu")


class AcceleratorSelectionWarning(UserWarning):
    """Auto-detection found several accelerators, or a plugin could not be loaded."""


@dataclass
class Selection:
    """The chosen accelerator and how it was chosen (shown by ``xtp env``)."""

    accelerator: Accelerator
    how: str  # "argument", "XTP_ACCELERATOR", "plugin", "auto-detected"
    also_present: list[str] = field(default_factory=list)


_cache: Selection | None = None
_plugin_cache: tuple[dict[str, Callable[[], Accelerator]], dict[str, str]] | None = None


def _load_builtin(name: str) -> Accelerator:
    module_name, cls_name = BUILTINS[name].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, cls_name)()


def plugins() -> tuple[dict[str, Callable[[], Accelerator]], dict[str, str]]:
    """Installed plugins: ``({name: factory}, {name: load error})``. Loaded once, lazily."""
    global _plugin_cache
    if _plugin_cache is not None:
        return _plugin_cache
    good: dict[str, Callable[[], Accelerator]] = {}
    broken: dict[str, str] = {}
    if plugins_disabled():
        _plugin_cache = (good, broken)
        return _plugin_cache
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        name = ep.name.lower()
        try:
            if name in BUILTINS:
                raise ValueError(f"it uses the built-in name {name!r}; rename it")
            factory = ep.load()
            if not callable(factory):
                raise TypeError(f"entry point {ep.value!r} is not a class or factory")
            good[name] = factory
        except Exception as exc:  # a broken plugin must not break xtp
            broken[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"xtp accelerator plugin {name!r} ({ep.value}) failed to load and is skipped: "
                f"{type(exc).__name__}: {exc}",
                AcceleratorSelectionWarning,
                stacklevel=2,
            )
    _plugin_cache = (good, broken)
    return _plugin_cache


def known_names() -> list[str]:
    """Built-in names followed by the plugins' names."""
    good, broken = plugins()
    return list(BUILTINS) + sorted(set(good) | set(broken))


def create(name: str) -> Accelerator:
    """Instantiate the accelerator called ``name`` (case-insensitive), without checking presence.

    Raises:
        UnknownAcceleratorError: ``name`` is neither built-in nor a plugin.
        AcceleratorError: ``name`` is a plugin that failed to load.
    """
    key = name.strip().lower()
    if key in BUILTINS:
        return _load_builtin(key)
    good, broken = plugins()
    if key in broken:
        raise AcceleratorError(f"accelerator plugin {key!r} could not be loaded: {broken[key]}")
    if key in good:
        acc = good[key]()
        if not isinstance(acc, Accelerator):
            raise AcceleratorError(
                f"accelerator plugin {key!r} returned {type(acc).__name__}, not an Accelerator"
            )
        return acc
    raise UnknownAcceleratorError(
        f"unknown accelerator {name!r}; valid choices: {', '.join(known_names())}"
    )


def _require_available(acc: Accelerator, source: str) -> Accelerator:
    avail = acc.availability()
    if not avail.available:
        raise AcceleratorUnavailableError(
            f"{source} selects accelerator {acc.name!r}, but it is not usable here: "
            f"{avail.reason}. To fix: {avail.hint or 'install its software stack'}; "
            f"or choose another one ({', '.join(known_names())}), or unset {ENV_ACCELERATOR} "
            "to auto-detect"
        )
    return acc


def _auto_detect() -> Selection:
    present: list[Accelerator] = []
    good, _ = plugins()
    for name in sorted(good):
        try:
            acc = create(name)
            if acc.is_available():
                present.append(acc)
        except Exception as exc:
            warnings.warn(
                f"xtp accelerator plugin {name!r} failed while detecting and is skipped: {exc}",
                AcceleratorSelectionWarning,
                stacklevel=3,
            )
    for name in DETECTION_ORDER:
        acc = _load_builtin(name)
        if acc.is_available():
            present.append(acc)
    chosen = present[0]
    others = [a.name for a in present[1:] if a.name != "cpu"]
    if others:
        warnings.warn(
            f"several accelerators are present ({', '.join(a.name for a in present)}); "
            f"using {chosen.name!r}. Set {ENV_ACCELERATOR} to choose explicitly.",
            AcceleratorSelectionWarning,
            stacklevel=3,
        )
    how = "plugin" if chosen.name in good else "auto-detected"
    return Selection(chosen, how, others)


def select(name: str | Accelerator | None = None) -> Selection:
    """Choose the accelerator (see module docstring) and cache the result.

    An explicit ``name`` (or instance) bypasses the cache and does not replace it.
    """
    global _cache
    if isinstance(name, Accelerator):
        return Selection(_require_available(name, "the argument"), "argument")
    if name is not None:
        return Selection(_require_available(create(name), "the argument"), "argument")
    if _cache is not None:
        return _cache
    from_env = accelerator_name()
    if from_env:
        acc = _require_available(create(from_env), f"{ENV_ACCELERATOR}={from_env}")
        sel = Selection(acc, ENV_ACCELERATOR)
    else:
        sel = _auto_detect()
    _cache = sel
    return sel


def get_accelerator(name: str | Accelerator | None = None) -> Accelerator:
    """The accelerator to use: ``name`` if given, else ``XTP_ACCELERATOR``, else detected."""
    return select(name).accelerator


def reset_accelerator() -> None:
    """Forget the cached selection and plugin list (tests, or after changing the environment)."""
    global _cache, _plugin_cache
    _cache = None
    _plugin_cache = None
