"""Engine-level failures the CLI reports as a message, not a traceback."""

from chunkstore.errors import StoreError


class BackupError(StoreError):
    """A backup or restore request that cannot be carried out as asked."""


class BadInputError(BackupError):
    """Input the user gave is malformed: a changed-areas file, a name, an image."""


class NotFoundError(BackupError):
    """A backup id, disk or VM that the catalog does not hold."""


class UsageError(BadInputError):
    """A command line that cannot mean anything: a malformed backup id, arguments in
    the wrong order.  Exit code 2, like argparse's own usage errors."""

    exit_code = 2


class FileLevelError(BadInputError):
    """What a point's disk holds cannot be read at file level as asked (engine/filesystems.py).

    ``what`` says in a few words what the volume holds instead, for listings."""

    def __init__(self, message: str, what: str | None = None):
        super().__init__(message)
        self.what = what


class NoFilesystemError(FileLevelError):
    """No filesystem The Sleuth Kit reads at that place of the disk."""


class EncryptedVolumeError(FileLevelError):
    """A LUKS or BitLocker volume: its files cannot be read without its key."""


class FilesystemDamaged(FileLevelError):
    """The filesystem's metadata is inconsistent: TSK could not follow it."""
class ToolMissingError(BackupError):
    """A program a command runs (nbdkit, its Python plugin, nbdfuse) is not
    installed or cannot load blockvault; the message names the Debian package."""


class ServeError(BackupError):
    """An export or a mount could not be started, or stopped abnormally."""


class BusyError(BackupError):
    """What a command would take is in use: a socket a live server listens on,
    a port, a directory that is already mounted.  Exit code 4, like a store
    held by another writer."""

    exit_code = 4
