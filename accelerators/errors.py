"""Exception types shared by the accelerator registry and the xtp core.

``XtpError`` is the root of every exception xtp raises on purpose; it lives here because
``accelerators/`` must not import the core (the core imports it from here).
"""

from __future__ import annotations


class XtpError(Exception):
    """Root of all xtp exceptions. Messages say what is wrong and how to fix it."""


class AcceleratorError(XtpError):
    """An accelerator could not be selected or used."""


class UnknownAcceleratorError(AcceleratorError, ValueError):
    """A name that is neither a built-in accelerator nor an installed plugin."""


class AcceleratorUnavailableError(AcceleratorError):
    """The named accelerator is known, but its hardware or software is missing here."""


class BackendUnavailableError(AcceleratorError):
    """A collective backend cannot be used with the selected accelerator."""


class EnvSettingError(AcceleratorError, ValueError):
    """An ``XTP_*`` environment variable holds a value xtp cannot use; the message names the
    variable, the value and the values that work (:mod:`xtp.accelerators.env`)."""


class CollectiveError(XtpError, RuntimeError):
    """A collective could not complete because a peer rank failed; the message names it (its
    process has exited, or it did not reach the collective) and says where to look next."""


class CollectiveTimeoutError(CollectiveError, TimeoutError):
    """A collective did not complete in time; the message names the rank(s) that did not arrive."""
