"""``--no-pack``, shared by ``xtp run``, ``verify`` and ``bench``: keep linear weights dense
instead of packing them for inference (:func:`xtp.pack_for_inference`; on CPU oneDNN's
layout for bf16/fp16, xtp's GEMV kernel for fp32). It sets ``XTP_CPU_PACK=0``, which the
ranks inherit."""

from __future__ import annotations

import os

from ..accelerators.cpu.packed_linear import ENV


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
