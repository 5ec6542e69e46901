"""Choosing the collective backend for an accelerator, honouring ``XTP_DIST_BACKEND``."""

from __future__ import annotations

from .._torch_compat import backend_available
from ..env import ENV_DIST_BACKEND, dist_backend
from ..errors import BackendUnavailableError
from .base import Accelerator

#: collective backends ``xtp env`` reports on (whether this torch can create each)
KNOWN_BACKENDS = ("gloo", "nccl", "xccl", "ccl", "hccl", "mpi", "ucc")


def resolve_dist_backend(acc: Accelerator, override: str | None = None) -> str:
    """The backend name to pass to ``init_process_group``, after the vendor import it needs.

    ``override`` (or else ``XTP_DIST_BACKEND``) replaces the accelerator's default, for example
    ``gloo`` on a GPU for debugging.

    Raises:
        BackendUnavailableError: the requested (or default) backend cannot be created here.
    """
    requested = override or dist_backend()
    source = "argument" if override else (f"{ENV_DIST_BACKEND}={requested}" if requested else None)
    backend = requested.lower() if requested else acc.default_dist_backend()
    try:
        acc.prepare_distributed(backend)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"collective backend {backend!r} for accelerator {acc.name!r} needs a package that "
            f"failed to import: {exc}. Install it, or set {ENV_DIST_BACKEND} to another backend"
        ) from exc
    if not backend_available(backend):
        where = f" (from {source})" if source else ""
        raise BackendUnavailableError(
            f"collective backend {backend!r}{where} is not usable with accelerator {acc.name!r}: "
            f"this torch cannot create it. Unset {ENV_DIST_BACKEND} to use the default, or pick "
            "one this torch has (`xtp env` lists them)"
        )
    return backend
