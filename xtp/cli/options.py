"""Options several commands share.

* ``--no-pack`` (``xtp run``, ``verify``, ``bench``): keep linear weights dense instead of
  packing them for inference (:func:`xtp.pack_for_inference`; on CPU oneDNN's layout for
  bf16/fp16, xtp's GEMV kernel for fp32). It sets ``XTP_CPU_PACK=0``, which the ranks inherit.
* ``--dtype NAME`` (``xtp preshard``, ``gather``): :func:`dtype_arg` turns the name into a
  ``torch.dtype``.
"""

from __future__ import annotations

import os

from ..accelerators.env import ENV_CPU_PACK as ENV


def add_pack_option(parser) -> None:
    parser.add_argument("--no-pack", action="store_true",
                        help="keep the sharded linear weights dense (default: packed in the "
                        "accelerator's fastest layout for inference, on CPU oneDNN's for "
                        "bf16/fp16 and xtp's GEMV kernel for fp32; "
                        f"{ENV}=0 does the same, {ENV}=all packs fp32 for oneDNN)")


def apply_pack_option(args) -> None:
    """Call in the parent process, before ranks start."""
    if getattr(args, "no_pack", False):
        os.environ[ENV] = "0"


def dtype_arg(name: str | None):
    """``torch.<name>`` for a ``--dtype`` value (``None`` stays ``None``); ArgumentError
    otherwise (:func:`xtp.models.inputs.check_dtype`)."""
    from ..models.inputs import check_dtype

    return check_dtype(name, "--dtype")
