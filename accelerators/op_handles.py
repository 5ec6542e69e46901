"""Integer names for the Python objects that xtp's torch custom ops act on.

A custom op takes tensors and plain values only, so an op that must reach a communicator or a
packed weight is given an integer, and looks the object up here at run time. The table holds
its objects weakly: a communicator or packed weight that nothing else holds any more is
dropped from it (a packed weight can be gigabytes). The integer is stored on the object, so
asking again gives the same one; it is assigned eagerly (when a model is sharded or packed),
before ``torch.compile`` traces anything.
"""

from __future__ import annotations

import itertools
import weakref

_NEXT = itertools.count(1)


class HandleTable:
    """Objects of one kind (``what``: named in errors), by integer handle."""

    def __init__(self, attr: str, what: str) -> None:
        self._attr = attr
        self._what = what
        self._objects: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
        self._pinned: dict[int, object] = {}  # objects that cannot be referenced weakly

    def handle(self, obj: object) -> int:
        """``obj``'s handle (assigned on the first call). Objects without a ``__dict__`` (a
        plugin's class with ``__slots__``) are found by identity; those that cannot be
        referenced weakly are kept alive by the table."""
        state = getattr(obj, "__dict__", None)
        found = state.get(self._attr) if state is not None else self._find(obj)
        if found is None:
            found = next(_NEXT)
            if state is not None:
                state[self._attr] = found
            try:
                self._objects[found] = obj
            except TypeError:
                self._pinned[found] = obj
        return found

    def _find(self, obj: object) -> int | None:
        for table in (self._objects, self._pinned):
            for h, known in list(table.items()):
                if known is obj:
                    return h
        return None

    def get(self, handle: int):
        """The object named ``handle``; RuntimeError when it is gone or was never here."""
        obj = self._objects.get(handle, self._pinned.get(handle))
        if obj is None:
            raise RuntimeError(f"xtp custom op: no {self._what} with handle {handle} in this "
                               "process (freed, or a graph compiled in another process)")
        return obj
