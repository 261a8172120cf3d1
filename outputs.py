"""Writing results safely and measuring memory, shared by train, evaluate and inference.

Used by every task: atomic writes (a crash never leaves a half-written adapter, result or prediction file),
JSON/JSONL result files, and peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _user_mode(path: str | Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the result the modes the user's umask asks for, like other tools."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it over `path` (atomic on one filesystem)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> None:
    """atomic_write_text for bytes; with overwrite=False an existing `path` is never replaced (FileExistsError):
    the finished file is hard-linked into place, which fails when the name is taken, even by a racing writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _user_mode(tmp, directory=False)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: exclusive creation still never overwrites
                with open(path, "xb") as f:
                    f.write(data)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


MANIFEST = ".written.json"  # in a folder atomic_dir wrote: the files it wrote, so a rewrite knows what is not its own
# What this tool writes, for folders written before the manifest existed
_OWN_KINDS = (".json", ".safetensors", ".bin", ".yaml", ".jinja", ".txt", ".model", ".md")


def foreign_files(path: str | Path) -> list[str]:
    """Files inside `path` that no task of this tool wrote (a user's .gguf beside the merged weights, say)."""
    path = Path(path)
    if not path.is_dir():
        return []
    present = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    try:
        ours = set(json.loads((path / MANIFEST).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return [name for name in present if not name.endswith(_OWN_KINDS)]
    return [name for name in present if name not in ours]


def refuse_foreign(path: str | Path) -> None:
    """Raise UserError when replacing `path` would delete files this tool did not write."""
    from config import UserError

    foreign = foreign_files(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"{path} holds files this tool did not write ({shown}); it replaces that folder whole, so "
                        "move them elsewhere first (nothing was changed)")


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder; on success it replaces `path` whole (the old one is kept as a backup
    until the swap is done), on failure it is removed and `path` stays as it was. Refused before anything is
    written when `path` holds files this tool did not write; every file gets the user's umask modes."""
    path = Path(path)
    refuse_foreign(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    _user_mode(tmp, directory=True)
    try:
        yield tmp
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        for p in tmp.rglob("*"):  # safetensors and others write 0600 files; a serving account must read them
            _user_mode(p, directory=p.is_dir())
        (tmp / MANIFEST).write_text(json.dumps(written, ensure_ascii=False), encoding="utf-8")
        _user_mode(tmp / MANIFEST, directory=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path` for a writer (a converter subprocess, say) to fill; on success it
    replaces `path` and is listed in the folder's manifest, on failure it is removed and `path` stays as it was.
    Refused before anything is written when `path` exists and this tool did not write it."""
    from config import UserError

    path = Path(path)
    if path.exists() and path.name in foreign_files(path.parent):
        raise UserError(f"{path} exists and this tool did not write it; move it elsewhere first (nothing was "
                        "changed)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _user_mode(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    manifest = path.parent / MANIFEST
    try:
        ours = set(json.loads(manifest.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        ours = set()
    atomic_write_text(manifest, json.dumps(sorted(ours | {path.name}), ensure_ascii=False))


def remove_stale_temporaries(run_dir: Path, of: str | None = None) -> None:
    """Temporary files and folders a killed run left (`.lora_model.x.tmp`, `.lora_model.old`), only those of
    the output named `of` when given (export: "merged"); call with the run folder's lock held, so no live run
    owns them."""
    if not run_dir.is_dir():
        return
    for path in run_dir.glob(f".{of}.*" if of else ".*"):
        if path.name.endswith((".tmp", ".old", ".tmp.png")) and path.name != ".lock":
            logger.info("removing %s, left by an interrupted run", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _try_lock(fd: int) -> bool:
    """An exclusive advisory lock on the open file, without waiting; the kernel drops it when the process ends,
    however it ends (kill -9 included)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def run_lock(run_dir: Path, what: str):
    """One run per run folder: `.lock` held with flock for the run's life, holding the PID, host, task and start
    time. The kernel releases it when its process dies, so a lock left by a killed run is free and two processes
    can never both hold it. Raises UserError naming the run that holds it."""
    # Not the `filelock` package: its lock file records no holder, and this refusal names the run that holds the
    # folder (task, PID, host, start time).
    from config import UserError

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "task": what,
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        if not _try_lock(fd):
            owner = _read_owner(fd)
            os.close(fd)
            raise UserError(f"{run_dir} is in use by another run ({owner.get('task', '?')}, process "
                            f"{owner.get('pid', '?')} on {owner.get('host', '?')}, started "
                            f"{owner.get('started', '?')}). Wait for it, or use another --output_dir")
        try:  # a holder that released between our open and our lock has unlinked that file: open the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    left = _read_owner(fd)
    if left.get("pid") not in (None, me["pid"]):
        logger.warning("%s was left by process %s, which has ended (%s); taking it over", lock, left.get("pid"),
                       left.get("task", "?"))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode("utf-8"))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiting process then sees a new file, not this one
        os.close(fd)


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict:
    """Peak memory so far: GPU allocations when CUDA is in use, and the process's peak RSS."""
    import torch

    out = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mb"] = round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except ImportError:  # Windows
        import psutil

        out["peak_rss_mb"] = round(psutil.Process().memory_info().peak_wset / 2**20, 1)
    return out
