"""Decoding worker processes that never outlive the command that started them: the one
pool ``prepare`` and ``classify`` decode images in (:func:`decode_pool`).

``prepare`` and ``classify`` decode images in a pool of processes. Killed with SIGKILL, the
parent cannot stop them, and a worker blocked on its task queue would wait forever. Each
worker therefore asks the kernel for SIGKILL when its parent dies (Linux's
``prctl(PR_SET_PDEATHSIG)``), and, where that is not available or the parent died before
the request, a watchdog thread ends the worker once its parent process is gone. Ctrl+C is
the parent's to handle: workers ignore SIGINT, so one keypress gives one message, not a
traceback per worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterable

import numpy as np

from threengan_cli.data import images

_PR_SET_PDEATHSIG = 1
WATCH_EVERY_S = 1.0


def _pdeathsig() -> bool:
    """Ask Linux to SIGKILL this process when its parent ends; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(WATCH_EVERY_S):
        if os.getppid() != parent:
            os._exit(1)  # the parent is gone: nothing will ever read our results


def die_with_parent(parent: int) -> None:
    """Call first thing in a worker (a pool's initializer), with the parent's pid."""
    with contextlib.suppress(ValueError, OSError):  # not the main thread: nothing to ignore
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _pdeathsig()
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
    # The watchdog also covers the case PR_SET_PDEATHSIG misses: it fires when the parent
    # *thread* that forked the worker ends, and a pool may be created from any thread.
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="parent-watch").start()


def _init_decoder(max_image_pixels: int | None, parent: int) -> None:
    # The pixel limit travels here explicitly: a worker started by spawn would otherwise use
    # Pillow's default.
    from PIL import Image

    die_with_parent(parent)
    Image.MAX_IMAGE_PIXELS = max_image_pixels


def decode_pool(workers: int):
    """A process pool for decoding images, whose workers die with this process.

    fork on Linux, as torch's DataLoader does: workers start in milliseconds and never
    re-import the caller's __main__ (spawn and forkserver do, which breaks callers without a
    main guard). Forking a process that has torch's thread pool is safe here because the
    workers never call into torch, only Pillow. macOS keeps spawn: fork is unsafe with its
    system frameworks.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from PIL import Image

    fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork" if fork else None),
        initializer=_init_decoder,
        initargs=(Image.MAX_IMAGE_PIXELS, os.getpid()),
    )


# ------------------------------------------------------------------------------ decoding
def _decode_file(task: tuple[str, int, str]) -> tuple[np.ndarray | None, str, str]:
    path, size, fit = task
    try:
        pixels, digest = images.load_image_and_hash(path, size, fit)
    except images.ImageReadError as exc:
        return None, "", str(exc)
    return pixels, digest, ""


def decode_files(
    paths: list[str], size: int, fit: str, workers: int, on_progress
) -> Iterable[tuple[np.ndarray | None, str, str]]:
    """(pixels or None, sha256, error) of every file, in order, decoded in the pool where
    there is work enough for it; ``on_progress(done, total)`` after each."""
    tasks = [(p, size, fit) for p in paths]
    total = len(tasks)
    if workers <= 1 or total < 2 * workers:
        for done, task in enumerate(tasks, start=1):
            yield _decode_file(task)
            if on_progress:
                on_progress(done, total)
        return
    # A few chunks per worker keeps inter-process overhead small without leaving a core idle
    # at the end; results come back in order.
    chunksize = max(1, min(64, total // (workers * 8)))
    executor = decode_pool(workers)
    try:
        for done, result in enumerate(executor.map(_decode_file, tasks, chunksize=chunksize), 1):
            yield result
            if on_progress:
                on_progress(done, total)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()
