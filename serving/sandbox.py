"""Every decode of an upload in its own short-lived process, with a memory budget it cannot exceed and a
wall-clock limit after which it is killed.

Header checks (bytes, width x height) bound what an image *claims*; a decoder can still allocate or spend
far more than the claim (a deflated DICOM inflating gigabytes of padding, a TIFF tile larger than the image,
a progressive JPEG with thousands of scans). A thread cannot be stopped and Python cannot cap what a C
decoder allocates, so each decode runs in a process that is:

- forked from a small, single-threaded `multiprocessing` fork server that has imported only the decoders
  (`serving.images`: PIL, pydicom, OpenCV, NumPy; no torch), so a fork costs milliseconds and never copies
  the server's threads or model;
- limited with `RLIMIT_AS` to its starting address space plus the budget, so an allocation past the budget
  fails inside the decoder (MemoryError) instead of growing the server;
- killed when the limit in seconds passes, which frees its memory and its decode slot at once.

No library offers this (a `concurrent.futures` process pool cannot kill one stuck task, nor cap memory per
task), hence the few lines here.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from datamodules.images import ImageDecodeError

PRELOAD = ["serving.images"]  # what the fork server imports once, so that each decode starts warm


class OverBudget(ImageDecodeError):
    """The decode needed more memory or time than one request may use (HTTP 413)."""


def _project_on_path() -> None:
    """Put this project first on $PYTHONPATH, which the fork server inherits.

    Python 3.11's fork server ignores the parent's sys.path (it is started with `python -c` in the parent's
    working directory), so `python /repo/cli.py serve` started elsewhere would decode with whatever `serving`
    package that directory or an installed copy provides, or fail to import this module at all.
    """
    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if paths[:1] != [root]:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *[p for p in paths if p != root]])


def _context():
    _project_on_path()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start() -> None:
    """Start the fork server now (about half a second), rather than during the first request."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _limit_memory(budget: int) -> None:
    """Cap this process's address space at what it uses now plus `budget` bytes (Linux: where there is no
    /proc, only the time limit applies)."""
    try:
        soft = _address_space() + budget
    except OSError:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _out_of_memory(e: BaseException | None) -> bool:
    """A failed allocation, as each decoder reports it: MemoryError, PIL's codec status -9 (out of memory),
    OpenCV's "Insufficient memory", or any error raised while handling a MemoryError (a Rust decoder panics)."""
    if e is None:
        return False
    text = str(e).lower()
    return (isinstance(e, MemoryError) or "memory" in text or "cannot allocate" in text or "error -9" in text
            or _out_of_memory(e.__context__))


def _child(conn: Connection, budget: int, fn: Callable[..., Any], args: tuple) -> None:
    """The decode process: limit itself, run `fn(*args)`, send ("ok", result) or ("error", exception)."""
    try:
        import cv2

        cv2.setNumThreads(1)  # one decode, one core: no thread pool whose stacks would eat the budget
    except ImportError:
        pass
    _limit_memory(budget)
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001  anything a decoder raises on hostile bytes becomes a 4xx
        if _out_of_memory(e):
            error: ImageDecodeError = OverBudget(f"decoding needs more than the memory budget of {budget // 2**20} MiB")
        elif isinstance(e, ImageDecodeError):
            error = e
        else:
            error = ImageDecodeError(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}".rstrip(": "))
        conn.send(("error", error))
    finally:
        conn.close()


def run(fn: Callable[..., Any], args: tuple, seconds: float, budget: int) -> Any:
    """`fn(*args)` in a fresh decode process; its result, or its exception raised here.

    Args:
        fn: a module-level function (it is pickled by reference).
        args: its arguments (pickled: bytes, arrays, dataclasses).
        seconds: wall-clock limit; past it the process is killed.
        budget: bytes the process may allocate beyond its start.

    Raises:
        OverBudget: past `seconds`, or an allocation past `budget`.
        ImageDecodeError: what `fn` raised, or the process died (a crashing decoder).
    """
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, budget, fn, args), daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(seconds):
            raise OverBudget(f"decoding took longer than the limit of {seconds:g} s")
        try:
            status, value = receiver.recv()
        except EOFError:  # the process died without answering
            proc.join(5)
            raise ImageDecodeError(f"the decoder crashed (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receiver.close()
        proc.close()
    if status == "error":
        raise value
    return value
