"""In-process units of the failure reporting: the launcher's one-line summary, the setup error
when rank 0 never comes up, checkpoint digests and config fingerprints that do not depend on
where a checkpoint was loaded from, the error classes."""

from __future__ import annotations

import shutil
from datetime import timedelta
from types import SimpleNamespace

import torch

from reliability_worker import tiny_model
from xtp.accelerators.errors import CollectiveError, CollectiveTimeoutError
from xtp.cli.launch import describe_failures
from xtp.distributed.consistency import checkpoint_digest, fingerprint
from xtp.distributed.failures import setup_failure as _setup_failure
from xtp.errors import XtpError
from xtp.planning.derive import derive_plan


def _failure(pid, exitcode, message, timestamp, signal=None):
    return SimpleNamespace(pid=pid, exitcode=exitcode, message=message, timestamp=timestamp,
                           signal_name=lambda: signal or "<N/A>")


def test_launcher_summary_names_the_first_failed_rank_on_one_line():
    exc = SimpleNamespace(failures={
        0: _failure(11, 1, {"message": "CollectiveError: all_reduce ... rank 1 exited\nmore",
                            "extraInfo": {}}, 101),
        1: _failure(12, -9, "Signal 9 (SIGKILL) received by PID 12", 100, "SIGKILL"),
    })
    line = describe_failures(exc, 3)
    assert "\n" not in line
    assert line.startswith("2 of 3 ranks failed: rank 1 (pid 12) was killed by signal SIGKILL; "
                           "then rank 0 (pid 11) failed: CollectiveError: all_reduce")
    assert line.endswith("the launcher stopped the other 1")


def test_launcher_summary_without_failure_records():
    text = "====\nf FAILED\n----\nsomething broke\n===="
    assert describe_failures(RuntimeError(text), 2) == "a rank failed: something broke"


def test_setup_error_when_rank_0_never_comes_up(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    exc = RuntimeError("The client socket has timed out after 3000ms while trying to connect "
                       "to (10.0.0.1, 29500).")
    msg = str(_setup_failure("gloo", exc, timedelta(seconds=3)))
    assert msg.startswith("rank 1 of 2 could not reach the rendezvous at 10.0.0.1:29500 within "
                          "3 s: rank 0, which hosts it, did not start, died")
    assert "XTP_TIMEOUT" in msg


def test_collective_errors_are_xtp_errors():
    assert issubclass(CollectiveTimeoutError, CollectiveError)
    assert issubclass(CollectiveError, XtpError) and issubclass(CollectiveError, RuntimeError)
    assert issubclass(CollectiveTimeoutError, TimeoutError)


def test_checkpoint_digest_follows_contents_not_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_model(0).save_pretrained(a)
    shutil.copytree(a, tmp_path / "copy")
    tiny_model(1).save_pretrained(b)
    assert checkpoint_digest(a) == checkpoint_digest(tmp_path / "copy")
    assert checkpoint_digest(a) != checkpoint_digest(b)


def test_fingerprint_ignores_where_the_config_was_loaded_from():
    one, two = tiny_model(), tiny_model()
    two.config._name_or_path = "/somewhere/else"
    plan = derive_plan(one, 2)
    assert fingerprint(one, plan) == fingerprint(two, plan)
    with torch.no_grad():
        two.lm_head.weight.add_(1)  # weights are not in the fingerprint (verify=True is)
    assert fingerprint(one, plan) == fingerprint(two, plan)


def test_failed_rank_of_a_sub_group_is_named_by_global_and_group_rank(monkeypatch):
    from xtp.accelerators.comm import failures as peers

    monkeypatch.setitem(peers._peers, 3, peers.Peer(3, "node7", "boot/ns", 4242))
    assert peers._who([3], {2: 0, 3: 1}, False) == "global rank 3 (group rank 1, pid 4242 on node7)"
    assert peers._who([3], {3: 3}, True) == "rank 3 (pid 4242 on node7)"
    assert peers._who([5], {5: 1}, False) == "global rank 5 (group rank 1)"
