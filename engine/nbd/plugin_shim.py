"""The file nbdkit's Python plugin loads: ``nbdkit python .../plugin_shim.py``.

nbdkit embeds Debian's /usr/bin/python3.11, not the interpreter blockvault is
installed in, so before anything of blockvault is imported this adds that
interpreter's site directories (BLOCKVAULT_NBDKIT_SITE, set by
engine/nbd/server.py; ``.pth`` files of editable installs are processed) in
front of Debian's, and the directory holding the ``engine`` package.  The
callbacks live in engine/nbd/export.py; this file only names them, so that
the ``open`` callback shadows the builtin here, where nothing uses it.
"""

import os
import site
import sys


def _add_site_dirs() -> None:
    before = list(sys.path)
    for d in os.environ.get("BLOCKVAULT_NBDKIT_SITE", "").split(os.pathsep):
        if d and os.path.isdir(d):
            site.addsitedir(d)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    added = [p for p in sys.path if p not in before]
    sys.path[:] = [root] + [p for p in added if p != root] + [p for p in before if p != root]


_add_site_dirs()

from engine.nbd import export as _export  # noqa: E402

API_VERSION = 2
config = _export.config
config_complete = _export.config_complete
thread_model = _export.thread_model
get_ready = _export.get_ready
cleanup = _export.cleanup
open = _export.open_connection
get_size = _export.get_size
block_size = _export.block_size
can_multi_conn = _export.can_multi_conn
can_extents = _export.can_extents
is_rotational = _export.is_rotational
can_cache = _export.can_cache
pread = _export.pread
extents = _export.extents
