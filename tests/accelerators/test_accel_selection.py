"""Selection tier (fakes): which accelerator and collective backend xtp picks, and why.

Nothing here runs on an XPU, a Gaudi or an NVIDIA GPU. Presence is faked (monkeypatched
``torch.cuda`` / ``torch.xpu``, Gaudi device nodes in a temporary folder, fake vendor packages
on ``sys.path``, fake entry points), which proves the *selection logic*: the precedence
argument > XTP_ACCELERATOR > plugins > auto-detection, strict errors, warnings, caching, and
that no vendor package is imported while detecting. Test names say ``with_fake_<vendor>``.

Every test here passes whatever ``XTP_ACCELERATOR`` the environment holds (the autouse fixture
in conftest.py removes it); tox's ``select-*`` envs pass their value in ``XTP_CI_ACCELERATOR``
too, which :func:`test_ci_accelerator_value_is_strict` checks against the real machine.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from importlib import metadata

import pytest
import torch
import torch.distributed as dist

import fakes
from xtp.accelerators import (
    DETECTION_ORDER,
    PLUGIN_GROUP,
    AcceleratorError,
    AcceleratorSelectionWarning,
    AcceleratorUnavailableError,
    BackendUnavailableError,
    UnknownAcceleratorError,
    create,
    get_accelerator,
    known_names,
    plugins,
    reset_accelerator,
    resolve_dist_backend,
    select,
)
from xtp.accelerators.devices import registry as registry_module
from xtp.accelerators.devices import xpu as xpu_module
from xtp.accelerators.devices.cpu import CpuAccelerator
from xtp.accelerators.devices.cuda import CudaAccelerator
from xtp.accelerators.devices.hpu import HpuAccelerator
from xtp.accelerators.devices.xpu import XpuAccelerator

BUILTIN_CHOICES = "cuda, xpu, hpu, cpu"


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """No accelerator present but cpu; methods make fake ones appear (see fakes.FakeStacks)."""
    stacks = fakes.FakeStacks(monkeypatch, tmp_path)
    yield stacks
    stacks.cleanup()


def _selection_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, AcceleratorSelectionWarning)]


# ---- XTP_ACCELERATOR: strict -------------------------------------------------------------


@pytest.mark.parametrize("value", ["cpu", "CPU", " Cpu "])
def test_env_cpu_selects_cpu_in_any_case(monkeypatch, fake, value):
    monkeypatch.setenv("XTP_ACCELERATOR", value)
    sel = select()
    assert isinstance(sel.accelerator, CpuAccelerator)
    assert sel.how == "XTP_ACCELERATOR"


@pytest.mark.parametrize("value", ["cuda", "xpu", "hpu", "XPU", "Hpu"])
def test_env_unavailable_accelerator_raises_with_reason_and_hint(monkeypatch, fake, value):
    monkeypatch.setenv("XTP_ACCELERATOR", value)
    avail = create(value).availability()
    assert not avail and avail.reason and avail.hint
    with pytest.raises(AcceleratorUnavailableError) as excinfo:
        get_accelerator()
    assert type(excinfo.value) is AcceleratorUnavailableError
    msg = str(excinfo.value)
    assert f"XTP_ACCELERATOR={value.strip()}" in msg
    assert avail.reason in msg and avail.hint in msg
    assert BUILTIN_CHOICES in msg


@pytest.mark.parametrize(
    ("setup", "name", "reason_part"),
    [
        (lambda f: f.cuda_not_built(), "cuda", "built without CUDA"),
        (lambda f: f.cuda(count=0), "cuda", "torch has CUDA but sees no GPU"),
        (lambda f: None, "xpu", "torch.xpu sees no Intel GPU"),
        (lambda f: None, "hpu", "habana_frameworks) is not installed"),
        (lambda f: f.hpu(nodes=0), "hpu", "no Gaudi device node"),
    ],
    ids=["cuda-not-built", "cuda-no-gpu", "xpu-no-device", "hpu-no-stack", "hpu-no-node"],
)
def test_env_unavailable_reason_says_what_is_missing(monkeypatch, fake, setup, name, reason_part):
    setup(fake)
    monkeypatch.setenv("XTP_ACCELERATOR", name)
    with pytest.raises(AcceleratorUnavailableError, match=re.escape(reason_part)):
        get_accelerator()


def test_env_xpu_on_torch_without_xpu_module(monkeypatch, fake):
    monkeypatch.delattr(torch, "xpu")
    monkeypatch.setenv("XTP_ACCELERATOR", "xpu")
    with pytest.raises(AcceleratorUnavailableError, match="has no torch.xpu module"):
        get_accelerator()


@pytest.mark.parametrize("value", ["nonsense", "gpu", "cuda0"])
def test_env_unknown_name_lists_valid_choices(monkeypatch, fake, value):
    monkeypatch.setenv("XTP_ACCELERATOR", value)
    with pytest.raises(UnknownAcceleratorError) as excinfo:
        get_accelerator()
    assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, AcceleratorError)
    assert repr(value) in str(excinfo.value)
    assert f"valid choices: {BUILTIN_CHOICES}" in str(excinfo.value)


def test_env_is_strict_even_when_another_accelerator_is_present_with_fake_cuda(monkeypatch, fake):
    fake.cuda()
    monkeypatch.setenv("XTP_ACCELERATOR", "xpu")
    with pytest.raises(AcceleratorUnavailableError):
        get_accelerator()  # never a silent fallback to the CUDA GPU that is there


@pytest.mark.parametrize("name", ["cuda", "xpu", "hpu"])
def test_env_selects_present_accelerator_with_fake_runtime(monkeypatch, fake, name):
    getattr(fake, name)()
    monkeypatch.setenv("XTP_ACCELERATOR", name.upper())
    sel = select()
    assert sel.accelerator.name == name and sel.how == "XTP_ACCELERATOR"


@pytest.mark.parametrize("value", ["", "   "])
def test_env_empty_means_auto_detect(monkeypatch, fake, value):
    monkeypatch.setenv("XTP_ACCELERATOR", value)
    assert select().how == "auto-detected"


def test_failed_env_selection_is_not_cached(monkeypatch, fake):
    monkeypatch.setenv("XTP_ACCELERATOR", "xpu")
    with pytest.raises(AcceleratorUnavailableError):
        get_accelerator()
    monkeypatch.delenv("XTP_ACCELERATOR")
    assert get_accelerator().name == "cpu"


def test_ci_accelerator_value_is_strict(monkeypatch):
    """The value tox's select-* env passes (default cpu), against this machine's real hardware."""
    name = os.environ.get("XTP_CI_ACCELERATOR", "cpu")
    monkeypatch.setenv("XTP_ACCELERATOR", name)
    avail = create(name).availability()
    if avail:
        sel = select()
        assert sel.accelerator.name == name.strip().lower() and sel.how == "XTP_ACCELERATOR"
    else:
        with pytest.raises(AcceleratorUnavailableError) as excinfo:
            select()
        assert avail.reason in str(excinfo.value) and avail.hint in str(excinfo.value)
    assert name != "cpu" or avail, "cpu must be usable everywhere"


# ---- explicit argument -------------------------------------------------------------------


@pytest.mark.parametrize("env", ["nonsense", "xpu", "cuda"])
def test_argument_beats_env(monkeypatch, fake, env):
    monkeypatch.setenv("XTP_ACCELERATOR", env)
    sel = select("cpu")
    assert sel.accelerator.name == "cpu" and sel.how == "argument"
    mine = CpuAccelerator()
    assert get_accelerator(mine) is mine


def test_argument_beats_env_with_fake_xpu(monkeypatch, fake):
    fake.xpu()
    monkeypatch.setenv("XTP_ACCELERATOR", "cpu")
    assert get_accelerator("xpu").name == "xpu"


def test_argument_is_strict_too(fake):
    with pytest.raises(AcceleratorUnavailableError, match="the argument selects accelerator 'xpu'"):
        get_accelerator("xpu")
    with pytest.raises(AcceleratorUnavailableError):
        get_accelerator(XpuAccelerator())
    with pytest.raises(UnknownAcceleratorError, match=BUILTIN_CHOICES):
        get_accelerator("nonsense")


def test_argument_bypasses_cache_and_keeps_it(fake):
    cached = select()
    assert select("cpu") is not cached
    assert select() is cached


# ---- auto-detection ----------------------------------------------------------------------


def test_detection_order_is_hpu_cuda_xpu_cpu():
    assert DETECTION_ORDER == ("hpu", "cuda", "xpu", "cpu")


@pytest.mark.parametrize(
    ("present", "expected", "others"),
    [
        ((), "cpu", []),
        (("xpu",), "xpu", []),
        (("cuda",), "cuda", []),
        (("hpu",), "hpu", []),
        (("cuda", "xpu"), "cuda", ["xpu"]),
        (("hpu", "xpu"), "hpu", ["xpu"]),
        (("hpu", "cuda"), "hpu", ["cuda"]),
        (("hpu", "cuda", "xpu"), "hpu", ["cuda", "xpu"]),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else None,
)
def test_auto_detect_order_with_fake_accelerators(fake, present, expected, others):
    fake.install_vendor_packages()
    for name in present:
        getattr(fake, name)()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sel = select()
    assert sel.accelerator.name == expected and sel.how == "auto-detected"
    assert sel.also_present == others
    messages = _selection_warnings(record)
    if others:
        assert len(messages) == 1
        assert all(name in messages[0] for name in present)
        assert f"using {expected!r}" in messages[0] and "XTP_ACCELERATOR" in messages[0]
    else:
        assert messages == []
    assert fake.imported() == [] and fakes.loaded_vendor_modules() == []


# ---- plugins (entry-point group xtp.accelerators) ----------------------------------------

PLUGIN_SOURCE = '''
import torch
from xtp.accelerators import Accelerator, Availability

class FakeNpu(Accelerator):
    name = "fakenpu"
    device_type = "cpu"
    def availability(self):
        return Availability(True)
    def device_count(self):
        return 1
    def device(self, index=None):
        return torch.device("cpu")
    def set_device(self, index):
        pass
    def init_device_id(self, local_index):
        return None
    def default_dist_backend(self):
        return "gloo"
    def supported_dtypes(self):
        return (torch.float32,)

class FakeAbsent(FakeNpu):
    name = "fakeabsent"
    def availability(self):
        return Availability(False, "no fake device plugged in", "plug one in")

class FakeCrashy(FakeNpu):
    name = "fakecrashy"
    def availability(self):
        raise RuntimeError("fake driver exploded")

def not_an_accelerator():
    return object()

NOT_CALLABLE = 42
'''


@pytest.fixture
def entry_points(monkeypatch, tmp_path):
    """``entry_points({name: "module:attr"})`` installs fake entry points in the plugin group;
    returns a list that records each plugin lookup."""
    (tmp_path / "xtp_fake_plugins.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "xtp_fake_broken_plugin.py").write_text(
        'raise ImportError("fake plugin needs libfakenpu.so")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list[str] = []
    real = metadata.entry_points

    def install(spec: dict[str, str]) -> list[str]:
        eps = [metadata.EntryPoint(n, v, PLUGIN_GROUP) for n, v in spec.items()]

        def fake_entry_points(**kwargs):
            if kwargs.get("group") == PLUGIN_GROUP:
                calls.append(PLUGIN_GROUP)
                return metadata.EntryPoints(eps)
            return real(**kwargs)

        monkeypatch.setattr(registry_module.metadata, "entry_points", fake_entry_points)
        reset_accelerator()
        return calls

    yield install
    reset_accelerator()
    for mod in ("xtp_fake_plugins", "xtp_fake_broken_plugin"):
        sys.modules.pop(mod, None)


GOOD = {"fakenpu": "xtp_fake_plugins:FakeNpu"}
BROKEN = {
    "importfails": "xtp_fake_broken_plugin:Thing",
    "nosuchmodule": "xtp_no_such_module_anywhere:Thing",
    "noattr": "xtp_fake_plugins:DoesNotExist",
    "notcallable": "xtp_fake_plugins:NOT_CALLABLE",
}


def test_good_plugin_is_known_and_selectable_by_env_in_any_case(monkeypatch, fake, entry_points):
    entry_points({**GOOD, "fakeabsent": "xtp_fake_plugins:FakeAbsent"})
    assert known_names() == ["cuda", "xpu", "hpu", "cpu", "fakeabsent", "fakenpu"]
    monkeypatch.setenv("XTP_ACCELERATOR", "FakeNPU")
    sel = select()
    assert sel.accelerator.name == "fakenpu" and sel.how == "XTP_ACCELERATOR"


def test_unknown_name_lists_plugins_among_valid_choices(monkeypatch, fake, entry_points):
    entry_points(GOOD)
    monkeypatch.setenv("XTP_ACCELERATOR", "nonsense")
    with pytest.raises(UnknownAcceleratorError, match=f"{BUILTIN_CHOICES}, fakenpu"):
        select()


def test_plugin_is_preferred_by_auto_detect_over_fake_cuda(fake, entry_points):
    fake.cuda()
    entry_points(GOOD)
    with pytest.warns(AcceleratorSelectionWarning, match="several accelerators") as record:
        sel = select()
    assert sel.accelerator.name == "fakenpu" and sel.how == "plugin"
    assert sel.also_present == ["cuda"]
    assert "fakenpu, cuda" in str(record[0].message)


def test_unavailable_plugin_is_skipped_by_auto_detect(fake, entry_points):
    entry_points({"fakeabsent": "xtp_fake_plugins:FakeAbsent"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = select()
    assert sel.accelerator.name == "cpu" and sel.how == "auto-detected"


def test_unavailable_plugin_selected_by_env_says_why(monkeypatch, fake, entry_points):
    entry_points({"fakeabsent": "xtp_fake_plugins:FakeAbsent"})
    monkeypatch.setenv("XTP_ACCELERATOR", "fakeabsent")
    with pytest.raises(AcceleratorUnavailableError, match="no fake device plugged in.*plug one in"):
        select()


def test_broken_plugins_are_warned_and_skipped(fake, entry_points):
    entry_points({**BROKEN, **GOOD})
    with pytest.warns(AcceleratorSelectionWarning) as record:
        sel = select()
    assert sel.accelerator.name == "fakenpu"
    messages = "\n".join(_selection_warnings(record))
    for name in BROKEN:
        assert f"plugin {name!r}" in messages and "skipped" in messages
    assert "fake plugin needs libfakenpu.so" in messages
    good, broken = plugins()
    assert set(good) == {"fakenpu"} and set(broken) == set(BROKEN)
    assert set(BROKEN) <= set(known_names())


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_plugin_selected_raises_accelerator_error(monkeypatch, fake, entry_points, name):
    entry_points(BROKEN)
    monkeypatch.setenv("XTP_ACCELERATOR", name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AcceleratorSelectionWarning)
        with pytest.raises(AcceleratorError, match=f"plugin {name!r} could not be loaded") as ei:
            select()
        assert not isinstance(ei.value, UnknownAcceleratorError)
        with pytest.raises(AcceleratorError):
            get_accelerator(name)


def test_plugin_returning_non_accelerator(monkeypatch, fake, entry_points):
    entry_points({"weird": "xtp_fake_plugins:not_an_accelerator"})
    with pytest.warns(AcceleratorSelectionWarning, match="'weird' failed while detecting"):
        assert select().accelerator.name == "cpu"
    with pytest.raises(AcceleratorError, match="returned object, not an Accelerator"):
        get_accelerator("weird")


def test_plugin_crashing_while_detecting_is_warned_and_skipped(fake, entry_points):
    entry_points({"fakecrashy": "xtp_fake_plugins:FakeCrashy", **GOOD})
    with pytest.warns(AcceleratorSelectionWarning, match="fake driver exploded"):
        assert select().accelerator.name == "fakenpu"


def test_plugin_may_not_shadow_a_builtin(fake, entry_points):
    entry_points({"cuda": "xtp_fake_plugins:FakeNpu"})
    with pytest.warns(AcceleratorSelectionWarning, match="built-in name 'cuda'"):
        good, broken = plugins()
    assert "cuda" in broken and not good
    assert isinstance(create("cuda"), CudaAccelerator)


def test_plugins_are_loaded_lazily_and_once(monkeypatch, fake, entry_points):
    calls = entry_points(GOOD)
    monkeypatch.setenv("XTP_ACCELERATOR", "cpu")
    assert get_accelerator().name == "cpu"
    assert calls == [], "selecting a built-in by name must not load plugins"
    monkeypatch.delenv("XTP_ACCELERATOR")
    reset_accelerator()
    select()
    select()
    known_names()
    assert len(calls) == 1
    reset_accelerator()
    select()
    assert len(calls) == 2


@pytest.mark.parametrize(("value", "loaded"), [("1", False), ("yes", False), ("0", True)])
def test_disable_plugins(monkeypatch, fake, entry_points, value, loaded):
    calls = entry_points(GOOD)
    monkeypatch.setenv("XTP_DISABLE_PLUGINS", value)
    assert select().accelerator.name == ("fakenpu" if loaded else "cpu")
    assert bool(calls) == loaded
    if not loaded:
        with pytest.raises(UnknownAcceleratorError):
            create("fakenpu")


# ---- caching -----------------------------------------------------------------------------


def test_selection_is_cached_until_reset(monkeypatch, fake):
    first = get_accelerator()
    assert get_accelerator() is first
    fake.xpu()
    monkeypatch.setenv("XTP_ACCELERATOR", "xpu")
    assert get_accelerator() is first, "the cached selection ignores later changes"
    reset_accelerator()
    assert get_accelerator().name == "xpu"


# ---- no vendor import while detecting -------------------------------------------------------


def test_detection_never_imports_vendor_packages_with_fake_stacks_installed(fake, monkeypatch):
    """IPEX, the oneCCL bindings and habana_frameworks are installed (fakes that log any import)
    and every accelerator is present; detection, describe() and `xtp env` import none of them."""
    from xtp.cli.env import collect

    assert fakes.loaded_vendor_modules() == []
    fake.install_vendor_packages()
    fake.cuda()
    fake.xpu()
    fake.hpu()
    monkeypatch.setattr(dist, "is_xccl_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AcceleratorSelectionWarning)
        assert get_accelerator().name == "hpu"
        for name in known_names():
            acc = create(name)
            assert acc.is_available()
            acc.device_count()
            acc.supported_dtypes()
            acc.describe()
        assert XpuAccelerator().default_dist_backend() == "ccl"  # found, not imported
        assert HpuAccelerator().default_dist_backend() == "hccl"
        info = collect()
    assert info["selected"]["name"] == "hpu"
    assert fake.imported() == []
    assert fakes.loaded_vendor_modules() == []


def test_oneccl_is_imported_only_when_ccl_is_prepared_with_fake_xpu(fake, monkeypatch):
    fake.install_vendor_packages()
    fake.xpu()
    fake.scratch_backend_registry()
    monkeypatch.setattr(dist, "is_xccl_available", lambda: False)
    acc = get_accelerator("xpu")
    assert fake.imported() == []
    assert resolve_dist_backend(acc) == "ccl"
    assert fake.imported() == ["oneccl_bindings_for_pytorch"]  # IPEX never


def test_hccl_is_imported_only_when_prepared_with_fake_habana(fake):
    fake.hpu()
    fake.scratch_backend_registry()
    acc = get_accelerator("hpu")
    assert fake.imported() == []
    assert resolve_dist_backend(acc) == "hccl"
    assert "habana_frameworks.torch.distributed.hccl" in fake.imported()


def test_broken_oneccl_import_is_a_backend_error_with_fake_xpu(fake, monkeypatch):
    fake.install_vendor_packages()
    fake.xpu()
    monkeypatch.setenv(fakes.ENV_ONECCL_BROKEN, "1")
    monkeypatch.setattr(dist, "is_xccl_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="built for another torch version"):
        resolve_dist_backend(get_accelerator("xpu"))


def test_hccl_without_habana_is_a_backend_error(fake):
    with pytest.raises(BackendUnavailableError, match="'hccl'.*failed to import"):
        resolve_dist_backend(HpuAccelerator())


# ---- default collective backends ------------------------------------------------------------


def test_xpu_default_backend_is_xccl_when_torch_has_it_with_fake_xpu(fake, monkeypatch):
    fake.install_vendor_packages()  # oneCCL installed too: xccl still wins
    fake.xpu()
    monkeypatch.setattr(dist, "is_xccl_available", lambda: True)
    assert get_accelerator("xpu").default_dist_backend() == "xccl"


def test_xpu_default_backend_is_ccl_when_oneccl_installed_with_fake_xpu(fake, monkeypatch):
    fake.xpu()
    monkeypatch.setattr(dist, "is_xccl_available", lambda: False)
    seen = []

    def find_spec(name, *args):
        seen.append(name)
        return object() if name == xpu_module.ONECCL_MODULE else None

    monkeypatch.setattr("importlib.util.find_spec", find_spec)
    assert XpuAccelerator().default_dist_backend() == "ccl"
    assert xpu_module.ONECCL_MODULE in seen
    assert fakes.loaded_vendor_modules() == []


def test_xpu_without_any_backend_says_what_to_install_with_fake_xpu(fake, monkeypatch):
    fake.xpu()
    monkeypatch.setattr(dist, "is_xccl_available", lambda: False)
    monkeypatch.setattr(xpu_module, "module_installed", lambda name: False)
    with pytest.raises(BackendUnavailableError) as excinfo:
        XpuAccelerator().default_dist_backend()
    msg = str(excinfo.value)
    assert "xccl" in msg and "oneccl_bindings_for_pytorch" in msg and "XTP_DIST_BACKEND=gloo" in msg


@pytest.mark.parametrize("nccl", [True, False])
def test_cuda_default_backend_with_fake_cuda(fake, monkeypatch, nccl):
    fake.cuda()
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
    if nccl:
        assert CudaAccelerator().default_dist_backend() == "nccl"
    else:
        with pytest.raises(BackendUnavailableError, match="XTP_DIST_BACKEND=gloo"):
            CudaAccelerator().default_dist_backend()


def test_cpu_default_backend_is_gloo_and_missing_gloo_is_an_error(monkeypatch):
    assert CpuAccelerator().default_dist_backend() == "gloo"
    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="no gloo backend"):
        CpuAccelerator().default_dist_backend()


# ---- XTP_DIST_BACKEND ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["gloo", "GLOO", " gloo "])
def test_dist_backend_env_override(monkeypatch, value):
    monkeypatch.setenv("XTP_DIST_BACKEND", value)
    assert resolve_dist_backend(CpuAccelerator()) == "gloo"


def test_dist_backend_env_gloo_overrides_fake_cuda_default(fake, monkeypatch):
    fake.cuda()
    monkeypatch.setenv("XTP_DIST_BACKEND", "gloo")
    assert resolve_dist_backend(get_accelerator("cuda")) == "gloo"


def test_dist_backend_argument_beats_env(monkeypatch):
    monkeypatch.setenv("XTP_DIST_BACKEND", "nosuchbackend")
    assert resolve_dist_backend(CpuAccelerator(), "gloo") == "gloo"


@pytest.mark.parametrize("value", ["nosuchbackend", "hccl"])
def test_dist_backend_env_unusable_raises(monkeypatch, value):
    monkeypatch.setenv("XTP_DIST_BACKEND", value)
    with pytest.raises(BackendUnavailableError) as excinfo:
        resolve_dist_backend(CpuAccelerator())
    assert f"XTP_DIST_BACKEND={value}" in str(excinfo.value)
    assert "Unset XTP_DIST_BACKEND" in str(excinfo.value)
