"""Keep glibc from handing batch-sized buffers back to the kernel after each use.

The pipelines allocate and free buffers of a few MiB per batch (compressed
frames, raw-chunk copies, pread results).  glibc serves such sizes with
mmap and returns them with munmap/madvise, so every batch pays its pages'
faults again; on a virtual machine that was about a quarter of a full
backup's system time.  Raising the mmap and trim thresholds keeps those
pages in the process for reuse.  Measured on a 2 GiB-allocated image
(256 KiB chunks): wall 3.0 s → 2.7 s, system time 1.5 s → 1.1 s, peak RSS
164–177 MiB.  Only the command line calls this: it is a process-wide
choice, not a library's to make.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """True when glibc accepted the settings (False elsewhere, harmlessly)."""
    try:
        # glibc's soname, loaded directly: ctypes.util.find_library costs
        # milliseconds of every command's start-up.
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
