"""Disk readers and hot-path kernels, in C.

``native`` knows nothing about stores or backups: it opens disks, lists their
allocated extents, reads chunk-aligned batches into caller buffers and spots
all-zero chunks, all with the GIL released so the engine's thread pool keeps
every core busy.  The compiled part is the private module ``native._native``
(sources beside this file); this package only re-exports it.
"""

from native._native import (Disk, count_items, create_vmdk, open_raw, open_vddk, open_vmdk,
                            vddk_end_access, vddk_prepare_access, zero_chunks)

__all__ = ["Disk", "count_items", "create_vmdk", "open_raw", "open_vddk", "open_vmdk",
           "vddk_end_access", "vddk_prepare_access", "zero_chunks"]
