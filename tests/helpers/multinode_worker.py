"""Rank-side code of the multi-node tier: the script each torchrun agent starts per rank.

``python multinode_worker.py world OUT_DIR`` runs on a world of two namespaced "nodes"
(tests/multinode/namespaced_nodes.py starts them) and writes what it saw to
``OUT_DIR/world-rank<RANK>.json`` and then ``OUT_DIR/kill-rank<RANK>.json`` for the test to
judge (one launch for both phases: starting the ranks is most of the cost). Environment from
the launcher: ``XTP_TEST_CKPT`` (this node's own copy of the checkpoint), ``XTP_TEST_CKPTS``
(every node's copy, ``os.pathsep``-separated: each node sees only its own), ``XTP_TEST_SAVE``
(a folder only node 0 can see), ``XTP_TIMEOUT``. A rank whose phase raised exits with
status 1, once the other ranks of its node wrote their result for that phase.

1. ``world``: the placement rules (tp 4 refused, tp 4 with the opt-in warned, its
   communicator not shared memory), then tp 2 x dp 2: topology, the shared-memory TP
   communicator and its exchange counter, inference parity, one training step against the
   unsharded step, ``from_pretrained`` from this node's copy, ``save_sharded`` into node 0's
   folder.
2. ``kill``: tp 2 x dp 2 training steps until a collective fails (after every rank wrote
   ``OUT_DIR/ready-<RANK>`` the test kills node 1); the error's type, message and time.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

CASE = "llama"


def _write(out_dir: str, scenario: str, result: dict) -> None:
    path = Path(out_dir) / f"{scenario}-rank{os.environ['RANK']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, path)


def _error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc)}


def placement() -> dict:
    """tp 4 over two nodes of 2: refused, then allowed with a warning (and no shared memory)."""
    import torch.distributed as dist

    import xtp
    from xtp.accelerators.cpu.shm import ShmCommunicator
    from xtp.distributed.topology import CrossNodeTPWarning

    out: dict = {}
    try:
        xtp.init_distributed(4)
        out["refused"] = None
    except Exception as exc:  # noqa: BLE001 - the test asserts on it
        out["refused"] = _error(exc)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ctx = xtp.init_distributed(4, allow_cross_node_tp=True)
    out["warnings"] = [str(w.message) for w in seen if issubclass(w.category, CrossNodeTPWarning)]
    out["cross_topology"] = ctx.topology.as_dict()
    out["cross_comm"] = type(ctx.communicator()).__name__
    shm, reason = ShmCommunicator.create(dist.group.WORLD)
    out["world_shm"] = shm is not None
    out["world_shm_reason"] = reason
    out.update(given_groups())
    return out


def given_groups() -> dict:
    """The user's own TP group or DeviceMesh: adopted as given; one that spans nodes was asked
    for, so it warns (never refuses); a node-local one is silent."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import xtp
    from xtp.distributed.topology import CrossNodeTPWarning

    out: dict = {}
    rank = dist.get_rank()
    cases = {
        # every rank creates every group (torch's rule), then adopts the one it is in
        "group_across": [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2],
        "mesh_inside": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")),
        "mesh_across": init_device_mesh("cpu", (2, 2), mesh_dim_names=("tp", "dp")),
    }
    for name, given in cases.items():
        kw = {"group": given} if name.startswith("group") else {"mesh": given}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ctx = xtp.init_distributed(**kw)
        out[name] = {
            "warnings": [str(w.message) for w in seen
                         if issubclass(w.category, CrossNodeTPWarning)],
            "tp_groups": ctx.topology.as_dict()["tp_groups"], "tp_size": ctx.tp_size,
            "dp_size": ctx.dp_size, "comm": type(ctx.communicator()).__name__}
    return out


def tp2_dp2(out: dict) -> None:
    """Topology, communicator, parity, training step, loading and saving at tp 2 x dp 2."""
    import xtp
    from load_worker import build_case, differences, output
    from training_worker import one_step

    ctx = xtp.init_distributed(2)
    out.update(rank=ctx.rank, tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank, host=socket.gethostname(),
               local_world=int(os.environ["LOCAL_WORLD_SIZE"]), topology=ctx.topology.as_dict(),
               describe=ctx.describe())
    comm = ctx.communicator()
    out["tp_comm"] = type(comm).__name__
    out["dp_backend"] = str(torch.distributed.get_backend(ctx.dp_group))

    # inference parity; the shared-memory communicator's exchange counter must move
    ref, model = build_case(CASE), build_case(CASE)
    want = output(ref, "causal")
    xtp.shard(model, context=ctx)
    before = getattr(comm, "_seq", None)
    got = output(model, "causal")
    out["shm_exchanges"] = None if before is None else comm._seq - before
    out["plan_collectives"] = sum(model._xtp_plan.collective_counts().values())
    out["parity_rel"] = float((got - want).norm() / want.norm())

    # one training step (the training suite's own check, world = tp 2 x dp 2)
    out["step"] = one_step(CASE, 2, "sgd")

    # from_pretrained from this node's own copy of the checkpoint
    ckpt = os.environ["XTP_TEST_CKPT"]
    out["ckpts_seen"] = [p for p in os.environ["XTP_TEST_CKPTS"].split(os.pathsep)
                         if Path(p, "config.json").exists()]
    loaded = xtp.from_pretrained(ckpt, context=ctx)
    out["ckpt"] = ckpt
    out["load_diffs"] = differences(model, loaded)
    out["load_rel"] = float((output(loaded, "causal") - want).norm() / want.norm())
    report = xtp.load_report(loaded)
    out["load_files"] = [str(f) for f in report.files_opened]

    # save_sharded into a folder only node 0 sees (dp replica 0 and rank 0 write there)
    save = Path(os.environ["XTP_TEST_SAVE"])
    xtp.save_sharded(loaded, save / "presharded")
    out["save_visible"] = (save / "presharded").exists()
    if ctx.dp_rank == 0:
        from safetensors.torch import load_file

        from xtp.formats.presharded import rank_file

        stored = load_file(str(save / "presharded" / rank_file(ctx.tp_rank, ctx.tp_size)))
        mine = {n: t for n, t in loaded.state_dict().items()}
        out["saved_keys"] = len(stored)
        out["saved_mismatch"] = [k for k, t in stored.items()
                                 if k in mine and not torch.equal(t, mine[k])]


def kill(out_dir: str) -> dict:
    """Train until a collective fails (60 s at most); ``ready`` files tell the test when to
    kill node 1."""
    import xtp
    from training_worker import batches, build, case_by_id, make_optimizer, sharded_loss
    from xtp.training import all_reduce_dp_gradients

    case = case_by_id(CASE)
    ctx = xtp.init_distributed(2)
    model = xtp.shard(build(case), context=ctx)
    opt = make_optimizer("sgd", model.parameters(), lr=1e-3)
    parts = batches(model.config, ctx.dp_size)
    out: dict = {"rank": ctx.rank, "host": socket.gethostname(), "error": None}
    step, deadline = 0, time.monotonic() + 60.0
    try:
        while time.monotonic() < deadline:
            opt.zero_grad()
            sharded_loss(model, case, parts[ctx.dp_rank]).backward()
            all_reduce_dp_gradients(model, ctx)
            opt.step()
            step += 1
            out["last_ok"] = time.time()
            if step == 2:
                Path(out_dir, f"ready-{ctx.rank}").touch()
    except Exception as exc:  # noqa: BLE001 - the test asserts on it
        out.update(error=_error(exc), failed_at=time.time(), steps=step)
    return out


def one_node_topology(tp: int) -> tuple[dict, str]:
    """For a RankPool rank (one host): this rank's topology and ``describe()`` at ``tp``."""
    import xtp

    ctx = xtp.init_distributed(tp)
    return ctx.topology.as_dict(), ctx.describe()


def _phase(out_dir: str, name: str, run) -> None:
    try:
        result = run()
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result = {"crash": traceback.format_exc(), **_error(exc)}
    _write(out_dir, name, result)
    if "crash" in result or result.get("error"):
        _wait_for_node_peers(out_dir, name)
        sys.exit(1)


def _wait_for_node_peers(out_dir: str, name: str) -> None:
    """Before a failing rank exits, wait (bounded) until the other ranks of its node wrote
    their result for phase ``name``: torchrun stops a node's remaining ranks with SIGTERM as
    soon as one of them exits non-zero, which would lose a peer still timing out on its own
    collective."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    first = int(os.environ["RANK"]) - int(os.environ.get("LOCAL_RANK", "0"))
    peers = [Path(out_dir) / f"{name}-rank{r}.json" for r in range(first, first + local)]
    deadline = time.monotonic() + 2 * float(os.environ.get("XTP_TIMEOUT", "30")) + 10
    while time.monotonic() < deadline and not all(p.exists() for p in peers):
        time.sleep(0.1)


def main() -> None:
    out_dir = sys.argv[2]
    torch.set_num_threads(1)

    def world() -> dict:
        result = placement()
        tp2_dp2(result)
        return result

    _phase(out_dir, "world", world)
    _phase(out_dir, "kill", lambda: kill(out_dir))


if __name__ == "__main__":
    main()
