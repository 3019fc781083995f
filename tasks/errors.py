"""User-facing error types: each message says what is wrong and how to fix it."""
from modeaudit.tasks.registry import ConfigError


class InputError(ConfigError):
    """Bad input data (embeddings, sizes, files)."""


class WorkerLost(ConfigError):
    """The cluster's workers died repeatedly (e.g. out of memory): one line, exit 2, finished shards kept."""
