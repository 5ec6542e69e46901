"""Contract tier: what every registered Accelerator must do, run for real where it is present.

The suite is parametrized over every built-in accelerator and every installed plugin. Where
``availability()`` is false the device tests are *skipped with the accelerator's own reason*
(visible in pytest's ``-ra`` summary); they never pass on fakes. On a CPU-only machine that
means cpu runs and cuda/xpu/hpu skip; on a GPU host the same tests run on the GPU.

Side-effect checks (constructing an accelerator changes no torch global and imports no
vendor package; ``describe()`` is JSON) run for every accelerator, present or not.

The extra ``selected`` case selects through ``XTP_ACCELERATOR`` the value that tox's
``select-*`` envs put in ``XTP_CI_ACCELERATOR`` (default: auto-detect) and runs the contract
on it, or skips with the selection error when it is not usable here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import fakes
from xtp.accelerators import (
    Accelerator,
    Communicator,
    XtpError,
    create,
    get_accelerator,
    known_names,
    resolve_dist_backend,
)
from xtp.accelerators._torch_compat import backend_available

NAMES = known_names()  # built-ins, then installed plugins
SELECTED = "selected"


def _selected(monkeypatch) -> Accelerator:
    name = os.environ.get("XTP_CI_ACCELERATOR", "").strip()
    if name:
        monkeypatch.setenv("XTP_ACCELERATOR", name)
    try:
        return get_accelerator()
    except XtpError as exc:
        pytest.skip(f"XTP_ACCELERATOR={name}: {exc}")


@pytest.fixture(params=[*NAMES, SELECTED])
def acc(request, monkeypatch) -> Accelerator:
    """A *present* accelerator; skips visibly with its reason when it is absent here."""
    if request.param == SELECTED:
        return _selected(monkeypatch)
    a = create(request.param)
    avail = a.availability()
    if not avail:
        pytest.skip(f"{request.param} is not available here: {avail.reason} -> {avail.hint}")
    return a


@pytest.fixture(params=NAMES)
def any_name(request) -> str:
    """Every registered name, present or not (side-effect checks)."""
    return request.param


# ---- device contract (present accelerators only) --------------------------------------------
# One clause per function, run by one test per accelerator: an absent accelerator gives one
# skip line (with its reason), and a failure's traceback names the clause that broke.


def _identity(acc):
    assert acc.name == acc.name.lower() and acc.name in known_names()
    assert isinstance(acc.device_type, str) and acc.device_type
    assert acc.device().type == acc.device(0).type == acc.device_type
    assert acc.name in repr(acc)


def _device_count_at_least_one(acc):
    assert isinstance(acc.device_count(), int) and acc.device_count() >= 1


def _set_device_and_synchronize(acc):
    acc.set_device(0)
    acc.synchronize()
    acc.synchronize(0)
    assert acc.current_device() == 0
    acc.mark_step()


def _supported_dtypes(acc):
    dtypes = acc.supported_dtypes()
    assert isinstance(dtypes, tuple) and torch.float32 in dtypes
    assert all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes)


def _tensors_compute_on_device_in_every_supported_dtype(acc):
    dev = acc.device()
    for dtype in acc.supported_dtypes():
        a = torch.ones(4, 4, dtype=dtype, device=dev)
        out = (a @ a + 1).sum()
        acc.synchronize()
        assert out.device.type == acc.device_type, dtype
        assert out.float().item() == 16 * 5, dtype


def _manual_seed_all_is_reproducible(acc):
    acc.manual_seed_all(1234)
    first = torch.rand(8, device=acc.device())
    acc.manual_seed_all(1234)
    assert torch.equal(first, torch.rand(8, device=acc.device()))


def _memory_stats_are_int_or_none(acc):
    torch.empty(1024, device=acc.device())
    for value in (acc.memory_allocated(), acc.max_memory_allocated()):
        assert value is None or (isinstance(value, int) and value >= 0)
    acc.reset_peak_memory_stats()


def _init_device_id_is_none_or_this_device_type(acc):
    dev = acc.init_device_id(0)
    assert dev is None or (dev.type == acc.device_type and dev.index == 0)


def _communicator_without_process_group_is_single_rank(acc):
    if dist.is_initialized():
        return
    comm = acc.communicator(None)
    assert isinstance(comm, Communicator) and comm.world_size == 1 and comm.rank == 0
    t = torch.ones(3, device=acc.device())
    assert comm.all_reduce(t) is t and torch.equal(t, torch.ones(3, device=acc.device()))


CLAUSES = [
    _identity, _device_count_at_least_one, _set_device_and_synchronize, _supported_dtypes,
    _tensors_compute_on_device_in_every_supported_dtype, _manual_seed_all_is_reproducible,
    _memory_stats_are_int_or_none, _init_device_id_is_none_or_this_device_type,
    _communicator_without_process_group_is_single_rank,
]


def test_device_contract(acc):
    for clause in CLAUSES:
        clause(acc)


def test_default_dist_backend_is_one_torch_can_create(acc):
    """Resolve the default backend (doing its vendor import) and create a 1-rank group with it."""
    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    backend = resolve_dist_backend(acc)
    assert backend == acc.default_dist_backend() and backend_available(backend)
    acc.set_device(0)
    kwargs = {}
    if acc.init_device_id(0) is not None:
        kwargs["device_id"] = acc.init_device_id(0)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    try:
        t = torch.full((4,), 2.0, device=acc.device(0))
        dist.all_reduce(t)
        acc.synchronize()
        assert t.cpu().tolist() == [2.0] * 4
        assert dist.get_backend() == backend
    finally:
        dist.destroy_process_group()


# ---- side effects (every accelerator, present or not) --------------------------------------


def _torch_globals() -> dict:
    snap = {
        "default_dtype": torch.get_default_dtype(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                  torch.backends.cudnn.allow_tf32),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "grad": torch.is_grad_enabled(),
        "rng": torch.get_rng_state(),
        "environ": dict(os.environ),
    }
    if hasattr(torch, "get_default_device"):
        snap["default_device"] = torch.get_default_device()
    return snap


def test_construction_changes_no_torch_global_and_imports_no_vendor(any_name):
    before, modules_before = _torch_globals(), set(sys.modules)
    acc = create(any_name)
    acc.availability()
    acc.supported_dtypes()
    acc.describe()
    try:
        acc.default_dist_backend()
    except XtpError:
        pass
    after = _torch_globals()
    for key in before:
        if key == "rng":
            assert torch.equal(before[key], after[key]), "the CPU RNG state changed"
        else:
            assert before[key] == after[key], f"{key} changed"
    new_vendor = [m for m in set(sys.modules) - modules_before
                  if m.split(".")[0] in fakes.VENDOR_TOPS]
    assert new_vendor == []


def test_describe_is_json_serialisable(any_name):
    info = create(any_name).describe()
    assert json.loads(json.dumps(info)) == info
    assert {"name", "device_type", "available", "reason", "hint", "device_count",
            "dist_backend", "dist_backend_error"} <= set(info)
    assert info["name"] == any_name


def test_fresh_interpreter_detection_imports_no_vendor_package(tmp_path):
    """In a new Python with fake IPEX / oneCCL / habana packages importable (each logs its
    import): importing xtp.accelerators, detecting and describing imports none of them."""
    root = fakes.write_vendor_packages(tmp_path / "vendor")
    log = tmp_path / "imports.log"
    code = textwrap.dedent("""
        import json, sys, torch
        threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
        import xtp.accelerators as xa
        infos = [xa.create(n).describe() for n in xa.known_names()]
        sel = xa.get_accelerator()
        vendor = [m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(",")]
        print(json.dumps({"vendor": vendor, "selected": sel.name,
                          "same": [threads == torch.get_num_threads(),
                                   dtype == torch.get_default_dtype()]}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XTP_")}
    env.update(PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]),
               **{fakes.ENV_LOG: str(log)})
    out = subprocess.run([sys.executable, "-c", code, ",".join(fakes.VENDOR_TOPS)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["vendor"] == [] and result["same"] == [True, True]
    assert fakes.imported_log(log) == []
