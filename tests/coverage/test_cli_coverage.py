"""``xtp coverage``: bad arguments are one line on stderr and exit code 2, before any rank."""

from __future__ import annotations

import pytest

from xtp.cli.coverage import parse_kinds, parse_tps
from xtp.cli.main import main
from xtp.errors import XtpError


@pytest.mark.parametrize("argv,message", [
    (["--tp", "1"], "xtp coverage: error: --tp '1': give distinct tp sizes >= 2, "
                    "comma-separated (e.g. 2,3)"),
    (["--tp", "2,x"], "xtp coverage: error: --tp '2,x': give distinct tp sizes >= 2, "
                      "comma-separated (e.g. 2,3)"),
    (["--tp", "2,2"], "xtp coverage: error: --tp '2,2': give distinct tp sizes >= 2, "
                      "comma-separated (e.g. 2,3)"),
    (["--kind", "causal,vision"], "xtp coverage: error: --kind 'causal,vision': choose from "
                                  "seq2seq, causal, masked, comma-separated"),
    (["--types", "llama,not_a_model"], "xtp coverage: error: --types: not_a_model not in the "
                                       "installed transformers' causal/masked/seq2seq LM "
                                       "mappings"),
    (["--types", "t5", "--kind", "masked"], "xtp coverage: error: --types: t5 not in the "
                                            "installed transformers' masked LM mappings"),
    (["--timeout", "0"], "xtp coverage: error: --timeout 0.0: give a positive number of "
                         "seconds"),
    (["--types", "llama", "--out", "/no/such/folder/x.json"],
     "xtp coverage: error: /no/such/folder/x.json: its folder does not exist"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, message):
    assert main(["coverage", *argv]) == 2
    out, err = capsys.readouterr()
    assert err == message + "\n" and out == ""


def test_argparse_errors_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["coverage", "--timeout", "soon"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--timeout: invalid float value: 'soon'" in err


def test_parsers():
    assert parse_tps("2, 3") == [2, 3]
    assert parse_kinds("masked,causal") == ["masked", "causal"]
    with pytest.raises(XtpError):
        parse_tps("")
