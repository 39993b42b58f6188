"""A failing sector, for tests: reads of one file's byte range raise EIO.

No device-mapper on the test machines (dmsetup finds no kernel driver) and
no FUSE, so the kernel's own EIO cannot be produced; this stands in for it
at the one call the store reads packs with, ``os.pread``.  A child process
gets it with PYTHONPATH=tests/faults and BLOCKVAULT_TEST_EIO=DEV:INODE:START:END
(the file's st_dev and st_ino, the bad byte range).  Inert without the variable.
"""

import errno
import os

_spec = os.environ.get("BLOCKVAULT_TEST_EIO")
if _spec:
    _dev, _ino, _start, _end = (int(x) for x in _spec.split(":"))
    _pread = os.pread

    def _failing_pread(fd, length, offset):
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (_dev, _ino) and offset < _end and offset + length > _start:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return _pread(fd, length, offset)

    os.pread = _failing_pread


# A process killed at one point of a commit, for tests: BLOCKVAULT_TEST_KILL=after-metadata
# SIGKILLs the process once a commit's metadata records are durable, before its LMDB commit
# (the window chunkstore/rebuild.py resolves: counted if it was the last thing that happened).
if os.environ.get("BLOCKVAULT_TEST_KILL") == "after-metadata":
    import signal

    from chunkstore import session as _session

    _write_metadata = _session.WriteSession._write_metadata

    def _write_metadata_then_die(self, records):
        _write_metadata(self, records)
        os.kill(os.getpid(), signal.SIGKILL)

    _session.WriteSession._write_metadata = _write_metadata_then_die
