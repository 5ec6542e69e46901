"""Telling this process's shared-memory peers that it failed in a collective elsewhere.

A rank that fails in one collective (say the data-parallel all-reduce over gloo, because a
node died) stops calling the collectives of its other groups. Its peers in those groups would
wait for it until their own timeout and then blame it ("did not arrive"), hiding the real
cause. So every xtp collective error is *announced*: each communicator that can tell its
peers (the shared-memory one: a flag and the message in its own control line and slot) is
registered here, and :func:`announce` hands the message to all of them. A peer waiting for
this rank then raises at once with this rank's message.

Only a process-wide registry of weak references; nothing here runs on the success path.
"""

from __future__ import annotations

import logging
import weakref
from typing import Protocol

log = logging.getLogger(__name__)


class FailureListener(Protocol):
    def peer_failed_elsewhere(self, message: str) -> None:
        """This process failed in another collective with ``message``: tell the peers."""


_listeners: weakref.WeakSet = weakref.WeakSet()


def register(listener: FailureListener) -> None:
    """Have ``listener`` told about every collective failure of this process."""
    _listeners.add(listener)


def announce(message: str, source: object | None = None) -> None:
    """Tell every registered listener but ``source`` that this process failed with
    ``message``. Never raises (it runs while an error is already being raised)."""
    for listener in list(_listeners):
        if listener is source:
            continue
        try:
            listener.peer_failed_elsewhere(message)
        except Exception:  # noqa: BLE001 - best effort: the original error is what matters
            log.debug("could not announce a collective failure to %r", listener, exc_info=True)
