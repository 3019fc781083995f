"""User-facing error types: each message says what is wrong and how to fix it."""
from modeaudit.tasks.registry import ConfigError


class InputError(ConfigError):
    """Bad input data (embeddings, sizes, files)."""
