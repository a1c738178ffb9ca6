"""The files of a checkpoint directory, opened as untrusted input.

A checkpoint is someone else's directory: its ``model.safetensors.index.json`` names the shard
files, and a name may point anywhere (``../other-model/model.safetensors``, ``/etc/passwd``), a
file may be a symlink out of the directory, a FIFO (an ``open`` that never returns) or a device.
:class:`CheckpointDir` opens a file only when

* its name is a relative path without ``..`` components (checked before any file system call);
* its real path (symlinks resolved) lies inside the directory, or, for a directory of the Hugging
  Face hub's cache (``<repo>/snapshots/<revision>/``, whose files are symlinks to
  ``<repo>/blobs/<hash>``), inside that repository's ``blobs/`` folder;
* the resolved file, opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO opens at once instead of
  blocking), is a regular file (``fstat``), no larger than the caller's limit.

Every refusal is a ``ValueError`` naming the entry and why.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any

__all__ = ["CheckpointDir"]

_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


class CheckpointDir:
    """A checkpoint directory whose files are opened only inside it, regular files only.

    Args:
      path: the directory (a symlink to it is fine: its real path is the root).
      op: the caller's name, for error messages (``"from_pretrained"``).

    Raises:
      FileNotFoundError: ``path`` is not a directory.
    """

    def __init__(self, path: str | os.PathLike, *, op: str = "from_pretrained"):
        self.path = os.fspath(path)
        self.op = op
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{op}: {self.path} is not a directory (expected a checkpoint directory).")
        self.root = os.path.realpath(self.path)
        parent = os.path.dirname(self.root)
        self._roots = [self.root]
        if os.path.basename(parent) == "snapshots":  # the hub's cache: snapshots/<rev>/f -> ../../blobs/<hash>
            self._roots.append(os.path.join(os.path.dirname(parent), "blobs"))

    def resolve(self, name: Any, *, what: str = "file") -> str:
        """The real path of entry ``name``, after checking that it stays inside the directory.

        Args:
          name: a relative path (as ``model.safetensors.index.json`` lists shards).
          what: what names it, for the error (``"model.safetensors.index.json entry"``).

        Raises:
          ValueError: ``name`` is not a non-empty string, is absolute, has a ``..`` component, or
            resolves (through symlinks) outside the directory.
        """
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError(f"{self.op}: {what} {name!r} is not a file name; expected a relative path in {self.path}.")
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
            raise ValueError(
                f"{self.op}: {what} {name!r} points outside the checkpoint directory {self.path}; expected a "
                "relative path without '..' (a checkpoint may only name its own files)."
            )
        real = os.path.realpath(os.path.join(self.root, name))
        if not any(_inside(real, r) for r in self._roots):
            raise ValueError(
                f"{self.op}: {what} {name!r} in {self.path} is a symlink to {real}, outside the checkpoint "
                "directory; copy the file into the directory (a checkpoint may only name its own files)."
            )
        return real

    def exists(self, name: str) -> bool:
        """Whether entry ``name`` exists (a dangling or escaping symlink counts as existing: opening it will say)."""
        return os.path.lexists(os.path.join(self.root, name))

    @contextlib.contextmanager
    def open_fd(self, name: Any, *, what: str = "file", max_bytes: int | None = None) -> Iterator[tuple[int, str]]:
        """Open entry ``name`` read-only: yields ``(fd, real path)``; the fd is closed on exit.

        Raises:
          ValueError: as :meth:`resolve`; the entry is not a regular file (a FIFO, a directory, a
            device) or is larger than ``max_bytes``.
          FileNotFoundError: the entry does not exist.
        """
        real = self.resolve(name, what=what)
        try:
            fd = os.open(real, _FLAGS)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.op}: {what} {name!r} is missing from {self.path}.") from None
        except OSError as e:  # ELOOP: the last component became a symlink since resolve()
            raise ValueError(f"{self.op}: cannot open {what} {name!r} in {self.path} safely: {e.strerror}.") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
                raise ValueError(f"{self.op}: {what} {name!r} in {self.path} is {kind}; expected a regular file.")
            if max_bytes is not None and st.st_size > max_bytes:
                raise ValueError(
                    f"{self.op}: {what} {name!r} in {self.path} has {st.st_size} bytes; expected at most {max_bytes}."
                )
            yield fd, real
        finally:
            os.close(fd)

    def read_text(self, name: str, *, what: str = "file", max_bytes: int = 64 << 20) -> str:
        """The whole of entry ``name`` as UTF-8 text (checked as :meth:`open_fd`, at most ``max_bytes``)."""
        with self.open_fd(name, what=what, max_bytes=max_bytes) as (fd, _):
            chunks, total = [], 0
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
                if total > max_bytes:  # grew after fstat
                    raise ValueError(f"{self.op}: {what} {name!r} in {self.path} grew past {max_bytes} bytes.")
                chunks.append(chunk)
        try:
            return b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.op}: {what} {name!r} in {self.path} is not UTF-8 text: {e}.") from None
