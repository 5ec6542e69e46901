"""Rank-side code for the reliability tests: a world where one rank fails on purpose.

:func:`run_world` starts ``world`` fresh processes (torchrun-style environment) running
``fn(*args)``; unlike :func:`ranks.spawn` it expects ranks to die, and returns what each
surviving rank reported plus every process's exit code, within a hard wall-clock bound.

The victim fails in one of three ways (``how``):

* ``"kill"``: SIGKILL to itself (a crash, the OOM killer);
* ``"exit"``: raises, so the harness reports it and the process ends (an uncaught exception);
* ``"hang"``: sleeps (alive, but never reaches the next collective).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

from ranks import free_port

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
            tie_word_embeddings=False)


def tiny_model(seed: int = 0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    return transformers.LlamaForCausalLM(cfg).eval()


def _main(rank, world, port, env, fn, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", XTP_ACCELERATOR="cpu")
    os.environ.update(env or {})
    import torch

    torch.set_num_threads(1)
    try:
        item = (rank, True, fn(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent
        item = (rank, False, traceback.format_exc())
    out.put(item)
    out.close()
    out.join_thread()
    os._exit(0)  # no destroy_process_group: it may block on a broken group


def run_world(fn, world: int, args=(), env=None, wall: float = 90.0):
    """Run ``fn(*args)`` on ``world`` ranks; return ``(results, exitcodes, pids)`` where
    ``results[rank] = (ok, value)`` for every rank that reported within ``wall`` seconds.
    Ranks still alive once the others reported (a hung victim) are killed."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_main, args=(r, world, port, env, fn, tuple(args), out))
             for r in range(world)]
    for p in procs:
        p.start()
        _unmark(p)  # a stale marker of an earlier process with this pid
    results: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + wall
    try:
        while time.monotonic() < deadline:
            alive = [r for r, p in enumerate(procs) if p.is_alive() and r not in results]
            try:
                rank, ok, value = out.get(timeout=0.2)
                results[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            if not alive and out.empty():
                break
            waiting = [r for r in alive if r not in results]
            if waiting and all(_hangs(procs[r]) for r in waiting) and results:
                break
    finally:
        for p in procs:
            p.join(timeout=0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
            _unmark(p)
    return results, {r: p.exitcode for r, p in enumerate(procs)}, [p.pid for p in procs]


def _marker(pid: int) -> str:
    return f"/tmp/xtp-test-hang-{pid}"


def _hangs(proc) -> bool:
    """True for a victim that marked itself hanging (see :func:`fail_here`)."""
    return os.path.exists(_marker(proc.pid))


def _unmark(proc) -> None:
    try:
        os.unlink(_marker(proc.pid))
    except FileNotFoundError:
        pass


def fail_here(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "exit":
        raise RuntimeError(f"rank {os.environ['RANK']} fails on purpose")
    if how == "hang":  # the parent kills it once the others reported, and removes the marker
        open(_marker(os.getpid()), "w").close()
        time.sleep(600)


#: when the collective under test was entered, where the action does local work before it
_ENTERED: list[float | None] = [None]


def _time_entry(module, name: str) -> None:
    """Record in :data:`_ENTERED` when ``module.name`` (the collective step) is called."""
    real = getattr(module, name)

    def timed(*args, **kwargs):
        _ENTERED[0] = time.monotonic()
        return real(*args, **kwargs)

    setattr(module, name, timed)


def outcome(action, t0: float | None = None) -> dict:
    """Run ``action``; report the exception it raised (type, message, seconds to raise, from
    ``t0``, or from entering the collective step timed by :func:`_time_entry`)."""
    import xtp

    t0 = time.monotonic() if t0 is None else t0
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"type": type(exc).__name__, "xtp": isinstance(exc, xtp.XtpError),
                "message": str(exc), "elapsed": time.monotonic() - (_ENTERED[0] or t0),
                "classes": [c.__name__ for c in type(exc).__mro__]}
    return {"type": None, "elapsed": time.monotonic() - t0}


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fail_at_call(module, name: str, k: int, how: str) -> None:
    """Make ``module.name`` (a barrier such as ``all_ranks_ok``) fail (``how``) on its
    ``k``-th call in this process, instead of taking part in it."""
    real, calls = getattr(module, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            fail_here(how)
        return real(*args, **kwargs)

    setattr(module, name, patched)


def _trained(ctx):
    """A tiny model sharded on ``ctx``, one forward/backward done, and its optimizer."""
    import torch

    import xtp

    model = xtp.shard(tiny_model(), context=ctx).train()
    ids = torch.arange(8).reshape(1, 8)
    model(ids, labels=ids).loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    return model, opt, ids


#: ``phase``: (the function whose ``k``-th call the victim fails at, k)
SAVE_STEPS = {"save-agree": 1, "save-write": 2, "save-finish": 3}
TRAIN_SAVE_STEPS = {"train-save": 2}


def phase_worker(phase: str, victim: int, how: str, folder: str | None = None) -> dict:
    """Every rank runs ``phase``; ``victim`` fails (``how``) just before its collective part.

    phase: ``"init"`` (init_distributed), ``"shard"``, ``"load"`` (from_pretrained(folder)),
    ``"forward"`` (a forward pass after one that worked), ``"save-agree"`` / ``"save-write"`` /
    ``"save-finish"`` (save_sharded(folder): the victim fails at its 1st / 2nd / 3rd
    every-rank-succeeded barrier: before writing, after the rank files, after finishing),
    ``"dp"`` (tp 1 x dp world: the data-parallel gradient all-reduce), ``"train-save"``
    (save_training_state(folder): the barrier after the optimizer files), ``"resume"``
    (load_training_state issues no collective: the survivors' next training step names the
    dead rank), ``"pack"`` (pack_for_inference issues none either: the packed model's next
    forward does), ``"bench"`` (the barrier of ``xtp bench``'s ranks)."""
    import torch

    import xtp

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    victim_here = rank == victim
    if phase == "init":
        if victim_here:
            fail_here(how)
        return outcome(lambda: xtp.init_distributed(world))
    ctx = xtp.init_distributed(1 if phase == "dp" else world)
    if phase == "shard":  # timed from the fingerprint exchange (the plan comes first)
        import xtp.sharding.api as sharding_api

        _time_entry(sharding_api, "check_fingerprints")
        model = tiny_model()
        before = _snapshot(model)
        if victim_here:
            fail_here(how)
        result = outcome(lambda: xtp.shard(model, context=ctx))
        result["unchanged"] = _same(before, _snapshot(model))
        return result
    if phase == "load":  # timed from the fingerprint exchange (skeleton and plan come first)
        import xtp.loading.common as common

        _time_entry(common, "check_fingerprints")
        if victim_here:
            fail_here(how)
        return outcome(lambda: xtp.from_pretrained(folder, context=ctx))
    if phase == "forward":
        model = xtp.shard(tiny_model(), context=ctx)
        ids = torch.arange(8).reshape(1, 8)
        with torch.no_grad():
            model(ids)
            if victim_here:
                fail_here(how)
            return outcome(lambda: [model(ids) for _ in range(3)])
    if phase in SAVE_STEPS:
        import xtp.loading.save as save

        model = xtp.shard(tiny_model(), context=ctx)
        if victim_here:
            _fail_at_call(save, "all_ranks_ok", SAVE_STEPS[phase], how)
        return outcome(lambda: xtp.save_sharded(model, folder))
    if phase == "dp":
        from xtp.training import all_reduce_dp_gradients

        model, _, _ = _trained(ctx)
        if victim_here:
            fail_here(how)
        return outcome(lambda: all_reduce_dp_gradients(model, ctx))
    if phase in TRAIN_SAVE_STEPS:
        import xtp.training.checkpoint as checkpoint

        model, opt, _ = _trained(ctx)
        if victim_here:
            _fail_at_call(checkpoint, "all_ranks_ok", TRAIN_SAVE_STEPS[phase], how)
        return outcome(lambda: checkpoint.save_training_state(model, opt, folder, step=1))
    if phase == "resume":
        from xtp.training import load_training_state, save_training_state

        model, opt, ids = _trained(ctx)
        save_training_state(model, opt, folder, step=1)
        if victim_here:
            fail_here(how)

        def resume_and_step():
            load_training_state(model, opt, folder)
            model(ids, labels=ids).loss.backward()
        return outcome(resume_and_step)
    if phase == "pack":
        model = xtp.shard(tiny_model(), context=ctx)
        ids = torch.arange(8).reshape(1, 8)
        with torch.no_grad():
            model(ids)
            xtp.pack_for_inference(model)
            if victim_here:
                fail_here(how)
            return outcome(lambda: [model(ids) for _ in range(3)])
    if phase == "bench":
        from xtp.bench.rank import barrier

        if victim_here:
            fail_here(how)
        return outcome(lambda: barrier("the barrier after loading"))
    raise ValueError(phase)


def disagree_worker(folders: list[str]) -> dict:
    """Ranks that disagree, one case after the other on one healthy world of 2 ranks; each
    case must raise RanksDisagreeError on every rank and leave the world usable. Last, the
    opt-in ``verify=True``: other weights are caught, the same weights pass."""
    import torch

    import xtp
    from xtp.errors import RanksDisagreeError

    rank = int(os.environ["RANK"])
    out: dict = {}

    def case(name, action):
        r = outcome(action)
        assert r["type"] == "RanksDisagreeError", (name, r)
        assert issubclass(RanksDisagreeError, xtp.XtpError)
        out[name] = r

    case("tp_size", lambda: xtp.init_distributed(2 if rank == 0 else 1))
    from xtp import _version

    real = _version.__version__
    if rank == 1:
        _version.__version__ = "0.0.0-other"
    try:
        case("xtp version", lambda: xtp.init_distributed(2))
    finally:
        _version.__version__ = real
    ctx = xtp.init_distributed(2)
    model = tiny_model(num_hidden_layers=2 + rank)
    before = _snapshot(model)
    case("model", lambda: xtp.shard(model, context=ctx))
    out["model"]["unchanged"] = _same(before, _snapshot(model))
    case("checkpoint", lambda: xtp.from_pretrained(folders[rank], context=ctx))
    case("weights", lambda: xtp.shard(tiny_model(seed=rank), context=ctx, verify=True))
    out["same weights"] = outcome(lambda: xtp.shard(tiny_model(0), context=ctx, verify=True))
    t = torch.ones(1)
    torch.distributed.all_reduce(t)  # the world still works after all of that
    out["world_ok"] = t.item() == 2
    return out
