"""Shared fixtures: clean accelerator selection per test, and session-wide rank pools."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from ranks import RankPool

# The property and fuzz tests draw the same examples on every run (CI must not fail on a case
# that no local run saw); HYPOTHESIS_PROFILE=explore draws new ones, to look for new failures.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def _fresh_accelerator_selection(monkeypatch):
    """Every test starts with no cached accelerator and no XTP_* selection variables."""
    from xtp.accelerators import reset_accelerator

    for var in ("XTP_ACCELERATOR", "XTP_DIST_BACKEND", "XTP_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_accelerator()
    yield
    reset_accelerator()


_pools: dict[int, RankPool] = {}


@pytest.fixture(scope="session")
def rank_pool():
    """``rank_pool(n)`` -> a session-wide :class:`RankPool` of ``n`` gloo ranks."""

    def get(n: int) -> RankPool:
        if n not in _pools or _pools[n]._broken:
            _pools[n] = RankPool(n)
        return _pools[n]

    yield get
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


#: for tests of behaviour that exists only in transformers >= 5 (fused 3-D experts, meta-device
#: planning of models whose 4.x forward has data-dependent Python branches)
requires_transformers5 = pytest.mark.skipif(
    _transformers_major() < 5,
    reason="needs transformers >= 5 (4.x: per-expert MoE modules, data-dependent forward code "
    "that a config-only plan cannot trace)",
)
