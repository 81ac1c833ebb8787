"""Output files: the one atomic-write helper every writer uses, and the checks made before any work.

:class:`AtomicFile` (:func:`atomic_path` for one-shot writes) writes to a temporary file in
the destination directory and moves it into place with ``os.replace``, so after an error or
Ctrl-C there is either the complete old file, the complete new file, or nothing. Audio
(:mod:`safa.audio_io`), videos (:mod:`safa.video_io`), PNGs and figures (:mod:`safa.plots`), the evaluation table and the
profiler's trace all go through it.

:func:`check_output_path` is the one check of an output path (its extension for the kind
of output, and that it can be written: the directory exists and is writable, the path is
not a directory and not a read-only file); :func:`check_free_space` the one disk-space check.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Dict, Iterator, Sequence, Tuple

__all__ = ["AUDIO_EXTENSIONS", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "OUTPUT_EXTENSIONS", "AtomicFile", "atomic_path", "write_text",
           "check_writable", "check_output_path", "check_free_space"]

AUDIO_EXTENSIONS = (".wav", ".flac")
IMAGE_EXTENSIONS = (".png",)
VIDEO_EXTENSIONS = (".mp4",)
# The file types written per kind of output.
OUTPUT_EXTENSIONS: Dict[str, Tuple[str, ...]] = {"audio": AUDIO_EXTENSIONS, "image": IMAGE_EXTENSIONS,
                                                 "video": VIDEO_EXTENSIONS}


def _read_only(path: str) -> bool:
    # The mode bits, not os.access: root may write anything, but a file its owner marked
    # read-only must not be replaced behind their back by a rename.
    return os.path.isfile(path) and not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def check_writable(path: str) -> None:
    """Raise ``OSError`` with a one-line reason unless a file can be created (or replaced) at ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        parent = directory
        while parent and not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OSError(f"{parent} is a file, not a directory")
        raise OSError(f"output directory {directory} does not exist")
    if os.path.isdir(path):
        raise OSError(f"output path {path} is a directory")
    if _read_only(path):
        raise OSError(f"{path} exists and is read-only (mode {stat.S_IMODE(os.stat(path).st_mode):o}): "
                      "remove it or make it writable to replace it")
    # os.access is not reliable (root, ACLs, read-only mounts): try creating a file.
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".safa-probe-")
    except OSError as exc:
        raise OSError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_path(path: str, kinds: Sequence[str] = tuple(OUTPUT_EXTENSIONS), name: str = "output path") -> None:
    """``ValueError`` naming ``name`` unless ``path`` ends in an extension of one of ``kinds`` and can be written."""
    allowed = tuple(ext for kind in kinds for ext in OUTPUT_EXTENSIONS[kind])
    if os.path.splitext(path)[1].lower() not in allowed:
        kind = f" ({kinds[0]} output)" if len(kinds) == 1 else ""
        raise ValueError(f"{name} must end in one of {', '.join(allowed)}{kind}, got {path!r}")
    try:
        check_writable(path)
    except OSError as exc:
        raise ValueError(f"cannot write {name} {path}: {exc}") from None


def check_free_space(needs: Dict[str, int]) -> None:
    """``needs``: bytes per output path; ``OSError`` unless each filesystem holds what its paths need."""
    per_device: Dict[int, list] = {}
    for path, size in needs.items():
        directory = os.path.dirname(os.path.abspath(path))
        entry = per_device.setdefault(os.stat(directory).st_dev, [directory, 0, []])
        entry[1] += size
        entry[2].append(os.path.basename(path))
    for directory, total, names in per_device.values():
        free = shutil.disk_usage(directory).free
        if total > free:
            raise OSError(f"{', '.join(names)} need about {total / 2**20:.1f} MiB but {directory} has "
                          f"{free / 2**20:.1f} MiB free")


class AtomicFile:
    """A temporary file next to ``path`` (same extension) that becomes ``path`` on :meth:`commit`.

    :meth:`discard` (or garbage collection before a commit) removes it, so no partial file is
    ever visible at ``path`` and no temporary file is left behind. A read-only file at
    ``path`` is never replaced (:meth:`commit` raises ``PermissionError``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        base, ext = os.path.splitext(os.path.basename(path))
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=f".part{ext}")
        os.close(fd)
        self.done = False

    def commit(self) -> None:
        """Move the temporary file onto ``path``."""
        if _read_only(self.path):
            self.discard()
            raise PermissionError(f"{self.path} is read-only: not replaced")
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        os.replace(self.tmp, self.path)
        self.done = True

    def discard(self) -> None:
        """Remove the temporary file (nothing happens after a commit)."""
        if not self.done:
            self.done = True
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)

    def __del__(self) -> None:
        self.discard()


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path`` (same extension); on success move it onto ``path``."""
    file = AtomicFile(path)
    try:
        yield file.tmp
        file.commit()
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        file.discard()
        raise


def write_text(path: str, text: str) -> None:
    """``text`` (and a final newline) written to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text + "\n")
