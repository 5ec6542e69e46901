"""``xtp env``: what accelerators this machine has, which one xtp would use, the host's CPU
topology and where xtp would place its ranks; under ``torchrun``, which global ranks form each
TP group, on which host, and on which CPUs each rank runs."""

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
from .placement import tp_arg


def add_parser(sub) -> None:
    p = sub.add_parser(
        "env",
        help="show detected accelerators and collective backends",
        description="List every built-in and plugin accelerator, whether it is usable here and "
        "why not, and which one xtp would select.",
        epilog=f"examples:\n  xtp env\n  xtp env --json --tp 4\n  {ENV_ACCELERATOR}=xpu xtp env"
        "\n  torchrun --nproc-per-node 4 -m xtp.cli.main env --tp 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--tp", type=tp_arg, default=None,
                   help="show the placement of N local ranks (default: the size --tp auto "
                   "chooses here); under torchrun: group the world into TP groups of N "
                   "(default: the whole world) and show them")
    p.set_defaults(func=run)


def placement_info(tp: int | str | None = None) -> dict:
    """The host's CPU topology, ``--tp auto``'s choice and why, and the placement of ``tp``
    local ranks (default: that choice) as ``xtp run``/``bench`` would pin them."""
    from ..accelerators.cpu.cpu_topology import read_topology
    from ..accelerators.cpu.placement import choose_tp, plan_placement, tp_hint
    from ..accelerators.env import pin_mode
    from ..accelerators.errors import EnvSettingError

    topo = read_topology()
    auto, why = choose_tp(topo)
    ranks = tp if isinstance(tp, int) else auto
    info = {"topology": topo.describe(), "tp_auto": auto, "tp_auto_reason": why,
            "pin": None, "local_ranks": ranks, "placement": None, "hint": tp_hint(topo, ranks),
            "error": ""}
    try:  # a bad XTP_PIN / XTP_NUM_THREADS is shown, not fatal: this command diagnoses
        info["pin"] = pin_mode()
        info["placement"] = plan_placement(topo, max(1, ranks),
                                           smt=info["pin"] == "smt").as_dict()
    except EnvSettingError as exc:
        info["error"] = str(exc)
    return info


def collect(tp: int | str | None = None) -> dict:
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
        "cpu": placement_info(tp),
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
    lines += render_cpu(info["cpu"])
    if info.get("world"):
        lines += render_world(info["world"])
    return "\n".join(lines)


_PIN = {"auto": "XTP_PIN unset: xtp run/bench pin the ranks they start, torchrun ranks are "
        "left alone", "on": "XTP_PIN=1: every CPU rank is pinned, torchrun's too",
        "smt": "XTP_PIN=smt: pinned with the SMT siblings", "off": "XTP_PIN=0: nothing is pinned"}


def render_cpu(cpu: dict) -> list[str]:
    place = cpu["placement"]
    k = cpu["local_ranks"]
    lines = ["", f"cpu: {cpu['topology']}", cpu["tp_auto_reason"]]
    if place is None:
        return lines + [f"placement: unknown -- {cpu['error']}"]
    lines.append(f"placement of {k} local rank{'s' if k != 1 else ''} ({_PIN[cpu['pin']]}): "
                 f"{place['note']}")
    for r in place["ranks"]:
        lines.append(f"  rank {r['local_rank']}: CPUs {r['cpus']} ({_threads(r['threads'])}, "
                     f"socket {','.join(map(str, r['sockets']))}, NUMA node "
                     f"{','.join(map(str, r['nodes']))})")
    if cpu["hint"]:
        lines.append(cpu["hint"])
    return lines


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def render_world(world: dict) -> list[str]:
    lines = ["", world["describe"]]
    for r in world["ranks"]:
        lines.append(f"  global rank {r['rank']} on {r['host']} (pid {r['pid']}): CPUs "
                     f"{r['cpus']}, {_threads(r['threads'])}")
    return lines


def world_info(tp: int | None) -> dict | None:
    """Under a launcher (``RANK``/``WORLD_SIZE`` set): ``init_distributed(tp)`` and each rank's
    host, pid, CPUs and threads, gathered to every rank; ``None`` elsewhere."""
    import os
    import socket

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    import torch.distributed as dist

    import xtp

    from ..accelerators.comm.failures import guarded
    from ..accelerators.cpu.cpu_topology import allowed_cpus, format_cpulist

    ctx = xtp.init_distributed(tp)
    mine = {"rank": ctx.rank, "host": socket.gethostname(), "pid": os.getpid(),
            "cpus": format_cpulist(allowed_cpus()), "threads": torch.get_num_threads()}
    ranks = [None] * ctx.world_size
    with guarded("gathering the ranks' placement"):
        dist.all_gather_object(ranks, mine)
        dist.barrier()
    # every rank leaves the group before exiting: a rank that exits while the others' gloo
    # threads still run can abort them ("terminate called without an active exception")
    dist.destroy_process_group()
    return {"describe": ctx.describe(), "rank": ctx.rank, "ranks": ranks,
            "topology": ctx.topology.as_dict() if ctx.topology is not None else None}


def run(args) -> int:
    import os

    from .launch import check_environment

    if args.tp is not None and args.tp != "auto" and args.tp < 1:
        raise XtpError(f"--tp must be >= 1, got {args.tp}")
    local = os.environ.get("LOCAL_WORLD_SIZE", "") if "RANK" in os.environ else ""
    info = collect(int(local) if local.isdigit() and int(local) > 0 else args.tp)
    if info["selected"]["name"] and "RANK" in os.environ:
        check_environment()  # XTP_PIN, XTP_NUM_THREADS, ...: one line, before any group
        world = world_info(args.tp if isinstance(args.tp, int) else None)
        if world is not None:
            info["world"] = world
            if world["rank"] != 0:  # rank 0 prints for the world
                return 0
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0 if info["selected"]["name"] else 2
