"""User-facing errors: the entry points print these as one clear message, without a traceback."""


class MedsegError(Exception):
    """Base class of errors caused by the user's input (config values, data files)."""


class ConfigError(MedsegError, ValueError):
    """A config value that cannot work, named by its config key."""


class DataError(MedsegError):
    """A data file or dataset layout that cannot be used, named by its path."""


class TrainingError(MedsegError):
    """A run that cannot go on (e.g. a non-finite loss), explained in one message."""


class ResourceError(MedsegError):
    """The machine ran out of memory or disk space: the run stops, what it finished is kept."""
