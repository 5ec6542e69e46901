"""torch.compile over a sharded model: the class-swapped TP layers trace, outputs unchanged;
the collectives and the packed matmul are custom ops, so a sharded model, packed or not,
compiles into one graph."""

from __future__ import annotations

import pytest
import torch

from ranks import spawn


def _compiled_vs_reference(pack: str = "dense"):
    import xtp
    from gemv_spy import install_gemv_spy
    from parity_cases import CASES
    from parity_worker import _build
    from xtp.accelerators.cpu.packed_linear import PACKABLE_DTYPES
    from xtp.accelerators.devices.cpu import CpuAccelerator

    case = next(c for c in CASES if c.id == "llama")
    ref, model = _build(case), _build(case)
    xtp.shard(model)
    shape, spy = (2, 7), None
    if pack == "onednn":  # every weight, however small, fp32 too: the packed matmul must trace
        cpu = CpuAccelerator(pack_min_bytes=0, pack_dtypes=PACKABLE_DTYPES)
        assert xtp.pack_for_inference(model, cpu) > 0
    elif pack == "gemv":  # fp32's default: one token, one thread, xtp's GEMV kernel
        assert xtp.pack_for_inference(model, CpuAccelerator(pack_min_bytes=0)) > 0
        torch.set_num_threads(1)
        shape, spy = (1, 1), install_gemv_spy()
    ids = torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        # fullgraph raises at any graph break: a collective or a packed matmul dynamo could not
        # trace (both are custom ops while compiling)
        got = torch.compile(model, fullgraph=True)(ids, use_cache=False).logits
    return float((got - want).norm() / want.norm()), spy.calls if spy is not None else 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("pack", ["dense", "onednn", "gemv"])
def test_torch_compile_of_sharded_model_matches_unsharded(pack):
    if pack == "gemv":
        from xtp.accelerators.cpu.gemv import kernel_isa, unavailable_reason

        if not kernel_isa():
            pytest.skip(f"no GEMV kernel: {unavailable_reason()}")
    results = spawn(_compiled_vs_reference, 2, args=(pack,), timeout=900)
    assert all(err <= 1e-5 for err, _ in results), results
    assert all((calls > 0) == (pack == "gemv") for _, calls in results), results


class _DoublingComm:
    """A stand-in communicator of 2 ranks whose peer holds the same tensor."""

    world_size, rank, group = 2, 0, None

    def all_reduce(self, t):
        return t.mul_(2)

    def all_gather(self, t, dim=-1, sizes=None):
        return torch.cat([t, t], dim)


def test_collective_custom_ops_match_the_communicator_and_their_fake_shapes():
    from xtp.accelerators.comm.compiled import all_gather, all_reduce, handle

    comm = _DoublingComm()
    h = handle(comm)
    assert handle(comm) == h and handle(_DoublingComm()) != h
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(torch.ops.xtp.all_reduce(x, h), x * 2)
    assert torch.equal(x, torch.arange(6.0).reshape(2, 3))  # the op leaves its input alone
    assert torch.equal(torch.ops.xtp.all_gather(x, h, 1, []), torch.cat([x, x], 1))
    torch.library.opcheck(torch.ops.xtp.all_reduce.default, (x, h))
    torch.library.opcheck(torch.ops.xtp.all_gather.default, (x, h, 0, []))
    torch.library.opcheck(torch.ops.xtp.all_gather.default, (x, h, 1, [3, 3]))
    # eagerly the helpers call the communicator itself (in place for all_reduce)
    y = x.clone()
    assert all_reduce(comm, y) is y and torch.equal(y, x * 2)
    assert torch.equal(all_gather(comm, x, 0, None), torch.cat([x, x], 0))

    @torch.compile(fullgraph=True)
    def step(t):
        return all_gather(comm, all_reduce(comm, t * 1.0) + 1, 1, None)

    assert torch.equal(step(x), torch.cat([x * 2 + 1, x * 2 + 1], 1))


class _ScaledPacked:
    """A stand-in packed weight: ``x @ (2 W).T + bias``."""

    def __init__(self, weight):
        self.weight, self.shape, self.dtype = weight, weight.shape, weight.dtype

    def matmul(self, x, bias=None):
        return torch.nn.functional.linear(x, self.weight * 2, bias)


def test_packed_linear_custom_op_matches_matmul_and_its_fake_shape():
    import gc

    from xtp.accelerators.packed.compiled import handle, packed_linear

    w, b = torch.randn(5, 3), torch.randn(5)
    packed = _ScaledPacked(w)
    h = handle(packed)
    x = torch.randn(2, 4, 3)
    want = torch.nn.functional.linear(x, w * 2, b)
    assert torch.equal(torch.ops.xtp.packed_linear(x, h, b), want)
    torch.library.opcheck(torch.ops.xtp.packed_linear.default, (x, h, b))
    torch.library.opcheck(torch.ops.xtp.packed_linear.default, (x, h, None))
    assert torch.equal(packed_linear(packed, x, b), want)
    assert torch.equal(torch.compile(packed_linear, fullgraph=True)(packed, x, b), want)
    del packed
    gc.collect()  # the table holds packed weights weakly: a freed one is gone from it
    with pytest.raises(RuntimeError, match=f"no packed weight with handle {h} in this process"):
        torch.ops.xtp.packed_linear(x, h, b)


def test_op_handles_for_objects_with_slots():
    from xtp.accelerators.op_handles import HandleTable

    class Slotted:
        __slots__ = ("x",)

    class SlottedWeak:
        __slots__ = ("x", "__weakref__")

    table = HandleTable("_h", "thing")
    a, b, plain = Slotted(), SlottedWeak(), _DoublingComm()
    ha, hb, hp = table.handle(a), table.handle(b), table.handle(plain)
    assert len({ha, hb, hp}) == 3
    assert (table.handle(a), table.handle(b), table.handle(plain)) == (ha, hb, hp)
    assert table.get(ha) is a and table.get(hb) is b and table.get(hp) is plain
