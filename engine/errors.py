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
