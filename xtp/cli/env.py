"""``xtp env``: what accelerators this machine has, and which one xtp would use."""

from __future__ import annotations

import argparse
import json
import platform
import warnings

import torch

from ..accelerators import ENV_ACCELERATOR, ENV_DIST_BACKEND, XtpError, create, plugins, select
from ..accelerators._torch_compat import backend_available
from ..accelerators.devices.backend import KNOWN_BACKENDS
from ..accelerators.devices.registry import BUILTINS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "env",
        help="show detected accelerators and collective backends",
        description="List every built-in and plugin accelerator, whether it is usable here and "
        "why not, and which one xtp would select.",
        epilog=f"examples:\n  xtp env\n  xtp env --json\n  {ENV_ACCELERATOR}=xpu xtp env",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def collect() -> dict:
    """Everything ``xtp env`` reports, as a JSON-able dict."""
    import os

    import transformers

    from .._version import __version__

    good, broken = plugins()
    rows = []
    for name in list(BUILTINS) + sorted(good):
        try:
            rows.append({**create(name).describe(), "plugin": name not in BUILTINS})
        except Exception as exc:
            rows.append({"name": name, "available": False, "reason": str(exc),
                         "plugin": name not in BUILTINS})
    for name, err in sorted(broken.items()):
        rows.append({"name": name, "available": False, "reason": f"plugin failed to load: {err}",
                     "plugin": True})
    selected: dict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sel = select()
            selected = {"name": sel.accelerator.name, "how": sel.how, "error": ""}
        except XtpError as exc:
            selected = {"name": None, "how": None, "error": str(exc)}
    return {
        "xtp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "env": {k: os.environ.get(k) for k in (ENV_ACCELERATOR, ENV_DIST_BACKEND)},
        "accelerators": rows,
        "collective_backends": {b: backend_available(b) for b in KNOWN_BACKENDS},
        "selected": selected,
    }


def render(info: dict) -> str:
    lines = [
        f"xtp {info['xtp']}  torch {info['torch']}  transformers {info['transformers']}  "
        f"python {info['python']}",
        "",
        f"{'accelerator':<12} {'usable':<7} {'devices':<8} {'backend':<10} notes",
    ]
    for r in info["accelerators"]:
        backend = r.get("dist_backend") or "-"
        note = r.get("reason") or ""
        if r.get("available") and r.get("dist_backend_error"):
            note = r["dist_backend_error"]
        if r.get("hint") and not r.get("available"):
            note += f" -> {r['hint']}"
        name = r["name"] + (" (plugin)" if r.get("plugin") else "")
        lines.append(
            f"{name:<12} {'yes' if r.get('available') else 'no':<7} "
            f"{r.get('device_count', 0):<8} {backend:<10} {note}"
        )
    usable = ", ".join(b for b, ok in info["collective_backends"].items() if ok) or "none"
    lines += ["", f"collective backends this torch can create: {usable}"]
    for r in info["accelerators"]:
        if r.get("available") and r.get("linear_packing"):
            lines.append(f"inference packing ({r['name']}): {r['linear_packing']}")
    for k, v in info["env"].items():
        if v:
            lines.append(f"{k}={v}")
    sel = info["selected"]
    if sel["name"]:
        lines.append(f"selected: {sel['name']} ({sel['how']})")
    else:
        lines.append(f"selected: none -- {sel['error']}")
    return "\n".join(lines)


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0 if info["selected"]["name"] else 2
