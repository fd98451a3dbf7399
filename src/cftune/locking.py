"""One writer per output folder: a lock per launch, held by the main process (issue 15).

The lock is an OS file lock (`filelock`: flock on POSIX) on `.<folder name>.lock` *beside* the
output folder, so the folder itself is never created, cleared or hashed because of it (a train
`--overwrite` or a merge may empty the folder while it is held). The kernel drops the lock when
its holder dies, even by `kill -9`, so a later launch takes it over without a stale-lock dance.
The holder's pid (and host) go in `.<folder name>.lock.pid` next to it, so a refused launch can
name the process it is waiting for; a clean release removes that file, so finding one on acquiring
means the previous holder died, which is reported in one line.

The ranks of one `accelerate launch` share the lock: only the main process (global rank 0, as
`RANK` says for torchrun/accelerate workers) takes it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from cftune.errors import CftuneError

F = TypeVar("F", bound=Callable[..., Any])


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a plain process (the env is what accelerate's
    `PartialState` reads too; asking it here would set up the process group too early)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def lock_paths(folder: str | os.PathLike) -> tuple[Path, Path]:
    """(lock file, pid file) of an output folder."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock", folder.parent / f".{folder.name}.lock.pid"


def _holder(pid_file: Path) -> str:
    try:
        pid, _, host = pid_file.read_text().strip().partition(" ")
    except OSError:
        return "another process (pid unknown)"
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    return f"pid {pid}{where}"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, main: bool | None = None) -> Iterator[None]:
    """Hold the writer's lock of `folder` for the block; a one-line `CftuneError` naming the
    holder's pid when another live process holds it. Non-main ranks (`main` False, default:
    `is_main_process()`) pass through: their main process holds it for them."""
    if not (is_main_process() if main is None else main):
        yield
        return
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CftuneError(f"output folder {folder} is a file; choose another --out")
    lock_file, pid_file = lock_paths(folder)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CftuneError(f"output folder {folder}: cannot create {lock_file.parent} "
                          f"({e.strerror}); choose another --out") from None
    existed = folder.exists()
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CftuneError(f"output folder {folder} is being written by {_holder(pid_file)} "
                          f"(lock {lock_file}); wait for it to finish or choose another "
                          f"--out") from None
    except OSError as e:
        raise CftuneError(f"output folder {folder}: cannot lock {lock_file} ({e.strerror})") from None
    try:
        if pid_file.exists():  # a clean release removes it: its holder died holding the lock
            print(f"cftune: note: took over the lock of {folder} left by {_holder(pid_file)}, "
                  f"which is no longer running", file=sys.stderr)
        pid_file.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        yield
    except BaseException:
        if not existed:  # a launch that failed leaves no empty folder behind
            _remove_empty_dirs(folder)
        raise
    finally:
        with contextlib.suppress(OSError):
            pid_file.unlink()
        lock.release()


def _remove_empty_dirs(folder: Path) -> None:
    """Remove `folder` and its sub-folders that hold no file (bottom-up; files are kept)."""
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


def output_locked(fn: F) -> F:
    """Decorate a stage entry point `fn(config, ...)` to run under `output_lock(config.out)`."""
    @functools.wraps(fn)
    def locked(config: Any, *args: Any, **kwargs: Any) -> Any:
        with output_lock(config.out):
            return fn(config, *args, **kwargs)
    return locked  # type: ignore[return-value]
