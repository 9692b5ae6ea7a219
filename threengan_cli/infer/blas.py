"""Per-image matrix products: an image's outputs never depend on the batch it came in.

Both classify engines run their products (the NumPy engine's forward pass, the
out-of-distribution score of both) through :func:`per_image`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


# Why one matrix product per image, on one BLAS thread: OpenBLAS's GEMM kernels sum a row's
# terms in an order that depends on where the row falls in the call (its tile, the tail of a
# block, the slice a thread takes). Measured on an AMD EPYC under the Haswell/Zen kernels
# (the ones OpenBLAS picks on AVX2 CPUs): moving the same rows by one position in a call
# changed a sixth of them in the last bits, even at a fixed call shape, so images batched
# into one product got probabilities that depended on their neighbours (525 of the 624 test
# images changed between --batch-size 1 and 64). np.matmul over a stack makes one call per
# image, always of the same shape and at the same position, so an image's probabilities are
# the same in every batch, shard and position. One BLAS thread per call keeps them the same
# for any thread count too, and is faster on these small products than two (measured: the
# classifier at 1.18x the time of one batched product, against 3x with BLAS threads); the
# images are spread over a thread pool instead (matmul releases the GIL).
@functools.cache
def _threads() -> tuple[int, ThreadPoolExecutor, Any]:
    """One thread per usable core, their pool, and a handle on BLAS's own thread count."""
    from threadpoolctl import ThreadpoolController

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    return cores, ThreadPoolExecutor(cores), ThreadpoolController()


def per_image(forward: Callable[[np.ndarray], tuple], images: np.ndarray) -> tuple:
    """``forward`` (images -> a tuple of per-image arrays, or ``None``s) over ``images``,
    split across the thread pool, with BLAS at one thread; the parts joined in order."""
    cores, pool, blas = _threads()
    chunks = [c for c in np.array_split(images, cores) if len(c)] or [images]
    with blas.limit(limits=1, user_api="blas"):
        parts = list(pool.map(forward, chunks))
    return tuple(
        None if pieces[0] is None else np.concatenate(pieces) for pieces in zip(*parts, strict=True)
    )
