"""User-facing error types: each message says what is wrong and how to fix it."""
import errno

from modeaudit.tasks.registry import ConfigError


class InputError(ConfigError):
    """Bad input data (embeddings, sizes, files)."""


class WorkerLost(ConfigError):
    """The cluster's workers died repeatedly (e.g. out of memory): one line, exit 2, finished shards kept."""


def disk_full(e: BaseException) -> bool:
    """A full disk or exhausted quota: reported in one line, never retried (retrying only fills it again)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
