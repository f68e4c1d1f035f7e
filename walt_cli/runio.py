"""Crash-safe files of a run directory (DESIGN.md §5).

Every file that a later step reads (checkpoints, exported weights, latent shards, statistics,
the shard index, metrics) is written through `atomic_path`: to a temp file in the same
directory, fsynced, renamed over the target (atomic on POSIX within one file system, which a
temp file in `$TMPDIR` is not), and the directory fsynced. A kill or a full disk therefore
leaves either the previous version or the new one, never a truncated file, and the temp file
is removed on any error.

`RunLock` keeps a second process out of a stage directory; `AtomicCheckpointIO` is the
Lightning checkpoint writer built on the same rename; `load_error` turns what a damaged file
raises into one line naming it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from walt_cli.errors import WaltError

log = logging.getLogger("walt.runio")

TEMP_MARK = ".walt-tmp-"
LOCK_NAME = ".walt.lock"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path: Path, err: OSError) -> WaltError:
    reason = err.strerror or str(err)
    hint = "; free some space and rerun" if err.errno == errno.ENOSPC else ""
    return WaltError(f"cannot write {path}: {reason}{hint}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside `path`; when the block ends without error, the temp file is
    fsynced and renamed to `path`. On any error the temp file is removed and `path` is as it was
    (an OSError such as ENOSPC becomes a one-line WaltError)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path.parent, err) from None
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def partial_dir(path: Path) -> Path:
    """Where a folder that replaces `path` (a sharded checkpoint) is written first."""
    return path.with_name(path.name + ".partial")


def old_dir(path: Path) -> Path:
    """Where `replace_dir` keeps the previous `path` until the new one is in place."""
    return path.with_name(path.name + ".old")


def replace_dir(new: Path | None, path: Path) -> None:
    """Put the finished folder `new` at `path` (None: remove `path`), crash safe: two renames
    with the previous version under `old_dir(path)` in between, so at every moment one complete
    version exists under `path` or `old_dir(path)` (`recover_dir` puts it back)."""
    import shutil

    def remove(p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()

    path = Path(path)
    old = old_dir(path)
    try:
        if path.exists():
            remove(old)  # `path` is complete: an older copy is not needed
            os.replace(path, old)
        if new is not None:
            _fsync_dir(Path(new))
            os.replace(new, path)
        _fsync_dir(path.parent)
        remove(old)
    except OSError as err:
        raise write_error(path, err) from None


def recover_dir(path: Path) -> None:
    """After a kill between `replace_dir`'s renames: the previous version back at `path`."""
    path, old = Path(path), old_dir(Path(path))
    if not path.exists() and old.exists():
        os.replace(old, path)


def clean_temps(folder: str | os.PathLike) -> int:
    """Remove temp files that a killed process left in `folder` (and below); returns how many.
    Called under the folder's `RunLock`, so no live writer owns them."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.rglob(f"*{TEMP_MARK}*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def check_writable(path: str | os.PathLike, *, what: str = "output") -> Path:
    """One-line error unless `path` can be created or replaced (checked before any compute)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise WaltError(f"{what} {path} is a directory")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise WaltError(f"{what} {path}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise WaltError(f"{what} {path}: {existing} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise WaltError(f"{what} {path} is not writable")
    return path


def refuse_same(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """One-line error when an output path names one of the inputs (it would be overwritten)."""
    out = Path(output)
    for src in inputs:
        if src is None:
            continue
        s = Path(src)
        same = out.resolve() == s.resolve()
        if not same and out.exists() and s.exists():
            same = os.path.samefile(out, s)
        if same:
            raise WaltError(f"the output {out} is the input {s}; choose another output path")


# ---------------------------------------------------------------------------------------------
# One process per stage directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def launcher_is_rank_zero() -> bool:
    """True in the process that a user started (not in the ranks that a launcher starts), and in
    global rank 0 under torchrun / SLURM, where every rank runs the command."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(key)
        if value not in (None, "", "0"):
            return False
    return True


class RunLock:
    """`<folder>/.walt.lock` names the process (pid and host) that writes `folder`.

    A second process exits with a one-line error naming the holder; the lock of a process that
    is gone (same host, pid not running: a kill -9) is taken over with a warning.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False
        self.created: list[Path] = []

    def acquire(self) -> RunLock:
        for p in (self.folder, *self.folder.parents):
            if p.exists():
                if not p.is_dir():
                    raise WaltError(f"{p} is a file; the run directory must be a folder")
                break
        # The folders this lock creates (deepest first): removed on release if still empty, so a
        # run refused before it wrote anything leaves no trace.
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.folder, err) from None
        host = socket.gethostname()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, owner = self._holder()
                if pid is not None and (owner != host or _alive(pid)):
                    raise WaltError(
                        f"{self.folder} is in use by process {pid} on {owner} (lock file "
                        f"{self.path}); wait for it to finish or stop it"
                    ) from None
                log.warning(
                    "%s: taking over the lock of process %s, which is no longer running",
                    self.folder,
                    pid,
                )
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path, stale)
                    stale.unlink()
                continue
            except OSError as err:
                raise write_error(self.path, err) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {host}\n")
            self.held = True
            clean_temps(self.folder)
            return self
        raise WaltError(f"{self.folder}: could not take the lock {self.path}")

    def _holder(self) -> tuple[int | None, str]:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None, "?"  # unreadable or half-written: its writer died before finishing

    def release(self) -> None:
        if self.held:
            pid, _ = self._holder()
            if pid == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False
            for folder in self.created:
                try:
                    folder.rmdir()
                except OSError:  # holds what the run wrote
                    break

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def stage_lock(folder: str | os.PathLike) -> Iterator[RunLock | None]:
    """`RunLock(folder)` in the process a user started; ranks started by a launcher (DDP
    children, torchrun / SLURM ranks other than 0) run under their rank zero's lock."""
    if not launcher_is_rank_zero():
        yield None
        return
    with RunLock(folder) as lock:
        yield lock


# ---------------------------------------------------------------------------------------------
# Reading


def load_error(path: str | os.PathLike, err: BaseException, what: str) -> WaltError:
    """A one-line error for a file that exists but cannot be read as `what`."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return WaltError(f"{path}: not a readable {what} ({type(err).__name__}: {first})")


def torch_load(path: str | os.PathLike, *, what: str = "training checkpoint") -> Any:
    """`torch.load(weights_only=True)` with one-line errors for truncated or foreign files."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WaltError(f"{path}: not found") from None
    except Exception as err:  # truncated zip, pickle errors, a non-checkpoint file
        raise load_error(path, err, what) from None


def _checkpoint_io_base():
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    return TorchCheckpointIO


class AtomicCheckpointIO(_checkpoint_io_base()):
    """Lightning's torch checkpoint I/O, written through `atomic_path` (Lightning's own writer
    stages the file in `$TMPDIR` and moves it, which is a copy, not a rename, when the run
    directory is on another file system: a kill then leaves a truncated checkpoint) and read
    with one-line errors."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import torch

        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        path = Path(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise WaltError(f"{path}: not found") from None
        except Exception as err:
            raise WaltError(
                f"{load_error(path, err, 'training checkpoint')}; move it away to start over"
            ) from None
