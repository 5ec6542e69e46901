"""Fuzzing every ``XTP_*`` variable: any text a user may set is either understood or refused
with :class:`EnvSettingError` naming the variable — never another exception.

The variables and their parsers are found in ``xtp.accelerators.env`` itself (every
``ENV_*`` name, every parser taking no argument), so a variable added there is fuzzed here
without editing this file; its docstring table must list it (the user's reference)."""

from __future__ import annotations

import inspect
import os
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xtp.accelerators import env
from xtp.accelerators.errors import EnvSettingError

VARIABLES = sorted(v for k, v in vars(env).items() if k.startswith("ENV_") and isinstance(v, str))
PARSERS = sorted(
    (name, fn) for name, fn in vars(env).items()
    if inspect.isfunction(fn) and fn.__module__ == env.__name__ and not name.startswith("_")
    and not inspect.signature(fn).parameters)

# text users type, plus the shapes that break naive parsers: unicode digits, signs, spaces,
# exponents, underscores, NUL-free control characters
VALUES = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=12),
    st.sampled_from(["²", "٣", "1e3", "-1", "+2", " 7 ", "0x10", "1_000", "inf", "nan", "-0",
                     "TRUE", "Off", "all ", "\t1", "3.5", "99999999999999999999"]),
)


def test_every_variable_is_listed_in_the_env_module_table():
    assert len(VARIABLES) >= 9 and len(PARSERS) >= 9
    for name in VARIABLES:
        assert f"``{name}``" in env.__doc__, f"{name} is missing from accelerators/env.py's table"


@pytest.mark.parametrize("variable", VARIABLES)
@settings(max_examples=60, deadline=None)
@given(value=VALUES)
def test_any_value_is_understood_or_refused_by_name(variable, value):
    with mock.patch.dict(os.environ, {variable: value}):
        _parse_all(variable, value)


def _parse_all(variable: str, value: str) -> None:
    for name, parse in PARSERS:
        try:
            parse()
        except EnvSettingError as e:
            message = str(e)
            assert "\n" not in message, (name, message)
            assert any(v in message for v in VARIABLES), (name, message)
        except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"{name}() with {variable}={value!r} raised {type(e).__name__}: {e}")
