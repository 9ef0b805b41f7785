"""Keep freed memory in the process while a job trains on CPU.

glibc hands every freed block over its mmap threshold (at most 32 MiB) back to the kernel, and the next
allocation of that size pays a page fault for every 4 KiB of it. A vgg_seed student at batch 128 makes
32 MiB activations (128 x 64 x 32 x 32 float32) and their gradients several times a step, so each step
mapped them anew: its ReLUs ran at about 6 GB/s, and the zero fill of max-pool gradients took as long as
a convolution. With mmap off (``M_MMAP_MAX`` 0) and no trimming of the heap's top, freed blocks are
reused: one training step of a 0.19x vgg_seed student (fp32, 2-core AMD EPYC Zen 3, 2 threads) went
from 232-259 ms to 171-173 ms. On leaving, the old behaviour is restored and the kept memory returned
(``malloc_trim``). Elsewhere than glibc this does nothing.

It works for threads on glibc's main arena, as a process's main thread is unless an allocation on it
has failed: glibc then moves the thread to another arena for good, and there blocks of 64 MiB and more
are always mapped afresh and wholly free heaps unmapped, whatever the settings. After a failed
``torch.empty(2**44)`` on the main thread, each of three 64 MiB blocks inside this scope took
16385-16423 page faults (16384 pages); without the failure the third took none, the first two having
grown the heap. A job runs in a fresh process.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_MMAP_MAX_DEFAULT = 65536
_MMAP_THRESHOLD_MAX = 32 * 2**20
"""Where glibc's own dynamic threshold ends up once large blocks have been freed (64-bit); restored
as a fixed value, with the trim threshold at twice it, as glibc's dynamic rule sets them."""
_KEEP_TRIM = 2**31 - 1
"""Trim threshold within the scope: the largest ``mallopt`` takes, so the heap's top is never trimmed."""

_lock = threading.Lock()
_depth = 0  # nested ``kept_heap`` scopes open in this process: malloc's settings are process-wide


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and other C libraries
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def kept_heap() -> Iterator[None]:
    """Within this scope freed memory stays in the process for reuse (glibc only; nests)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
                libc.malloc_trim(ctypes.c_size_t(0))
