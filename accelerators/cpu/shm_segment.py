"""The shared-memory segment behind :mod:`xtp.accelerators.cpu.shm`: its layout and its lifecycle.

Lifecycle (the point of this file is that no ``/dev/shm`` entry outlives a run):

1. group rank 0 calls :meth:`ShmSegment.create` (a file ``/dev/shm/xtp_shm_<pid>_<token>``,
   pages reserved up front with ``posix_fallocate`` so a full ``/dev/shm`` is an ``OSError`` at
   creation, never a ``SIGBUS`` later);
2. every other rank calls :meth:`ShmSegment.attach` with the name and token it was sent;
3. as soon as every rank has attached, rank 0 calls :meth:`ShmSegment.unlink`. From then on
   the segment has no name: the kernel frees it when the last process that maps it exits,
   whether it exits normally, raises or is killed. Only a rank 0 killed between steps 1 and 3
   (one gloo round trip) can leave a name behind.

Layout (``SegmentLayout``), all offsets in bytes::

    0       magic b"XTPSHM01" | token (16 ASCII bytes) | world (int64) | slot_bytes (int64)
    64      one 64-byte control line per rank (its own cache line: no false sharing), as
            int64 words: [0] sequence number published, [1] pid,
            [2 + 2*set] op code, [3 + 2*set] element count   (set = 0 or 1),
            [6] 1 once the rank failed in another collective, [7] byte length of that
            failure's message (kept in the rank's slot of the set its next step would use)
    data    page-aligned: 2 buffer sets x world slots x slot_bytes
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

SHM_DIR = "/dev/shm"
PREFIX = "xtp_shm_"
MAGIC = b"XTPSHM01"
LINE_BYTES = 64
#: int64 words per control line
LINE_WORDS = LINE_BYTES // 8
_PAGE = 4096
_HEADER = struct.Struct("<8s16sqq")


@dataclass(frozen=True)
class SegmentLayout:
    """Byte layout of a segment for ``world`` ranks with ``slot_bytes`` per rank and set."""

    world: int
    slot_bytes: int

    def __post_init__(self) -> None:
        if self.world < 1 or self.slot_bytes < LINE_BYTES or self.slot_bytes % LINE_BYTES:
            raise ValueError(
                f"bad segment layout: world={self.world}, slot_bytes={self.slot_bytes} "
                f"(slot_bytes must be a positive multiple of {LINE_BYTES})"
            )

    @property
    def control_offset(self) -> int:
        return LINE_BYTES

    @property
    def control_bytes(self) -> int:
        return LINE_BYTES * self.world

    @property
    def data_offset(self) -> int:
        end = self.control_offset + self.control_bytes
        return (end + _PAGE - 1) // _PAGE * _PAGE

    @property
    def data_bytes(self) -> int:
        return 2 * self.world * self.slot_bytes

    @property
    def size(self) -> int:
        return self.data_offset + self.data_bytes


def shm_supported() -> str | None:
    """``None`` when this host can hold segments, else the reason it cannot."""
    if not os.path.isdir(SHM_DIR):
        return f"{SHM_DIR} does not exist (not Linux, or not mounted)"
    if not os.access(SHM_DIR, os.W_OK | os.X_OK):
        return f"{SHM_DIR} is not writable by this user"
    return None


class ShmSegment:
    """One mapped segment. Create with :meth:`create` (rank 0) or :meth:`attach` (others)."""

    def __init__(self, name: str, layout: SegmentLayout, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.layout = layout
        self.mm = mm
        self.owner = owner
        self._unlinked = False

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, layout: SegmentLayout, token: str) -> ShmSegment:
        """Create, size and map a new segment whose header carries ``token``.

        Raises:
            OSError: ``/dev/shm`` is missing or lacks ``layout.size`` free bytes (the file is
                removed again before raising).
        """
        name = f"{PREFIX}{os.getpid()}_{token}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, layout.size)
            mm = mmap.mmap(fd, layout.size)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)
        _HEADER.pack_into(mm, 0, MAGIC, token.encode("ascii"), layout.world, layout.slot_bytes)
        return cls(name, layout, mm, owner=True)

    @classmethod
    def attach(cls, name: str, layout: SegmentLayout, token: str) -> ShmSegment:
        """Map the segment ``name`` created by rank 0 and check it is the one we were sent.

        Raises:
            OSError: the file is not there (for example another IPC namespace's /dev/shm).
            ValueError: its size or header does not match ``layout`` and ``token``.
        """
        if os.sep in name or not name.startswith(PREFIX):
            raise ValueError(f"not an xtp shared-memory segment name: {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != layout.size:
                raise ValueError(f"segment {name} has {size} bytes, expected {layout.size}")
            mm = mmap.mmap(fd, layout.size)
        finally:
            os.close(fd)
        magic, tok, world, slot = _HEADER.unpack_from(mm, 0)
        if (magic, tok, world, slot) != (
            MAGIC, token.encode("ascii"), layout.world, layout.slot_bytes
        ):
            mm.close()
            raise ValueError(f"segment {name} does not carry the expected header")
        return cls(name, layout, mm, owner=False)

    def unlink(self) -> None:
        """Remove the name (idempotent; any rank may call it). The memory stays mapped."""
        if not self._unlinked:
            self._unlinked = True
            _unlink_quietly(self.path)

    def close(self) -> None:
        """Unmap, if no tensor view of the segment is still alive; otherwise the mapping goes
        when the last view is garbage collected (or the process exits)."""
        try:
            self.mm.close()
        except BufferError:
            pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
