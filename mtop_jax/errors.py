"""The project's own exceptions.

Everything a user can get wrong (a path, a file, a config field) raises one of
these with a message that names the thing and what was expected; the CLI prints
it as one line instead of a traceback.
"""


class MtopError(Exception):
    """Base class of every error the project raises on purpose."""


class WeightsError(MtopError):
    """A pretrained checkpoint that cannot be found, read, or matched to its config."""


class ConfigError(MtopError):
    """A configuration value that is missing, of the wrong type or inconsistent."""


class DataError(MtopError):
    """Input data that cannot be parsed or does not match the task specs."""
