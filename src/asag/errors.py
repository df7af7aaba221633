"""User-facing errors: raised for bad input, printed by the command line without a traceback."""


class AsagError(Exception):
    """An error caused by the user's input (a file, a preset, an option), with a readable message."""


class ConfigError(AsagError):
    """An invalid configuration: unknown key, wrong type, value out of range, inconsistent options."""


class DataError(AsagError):
    """A data set problem: missing or malformed annotation file, unreadable image, bad box."""


class CheckpointError(AsagError):
    """A checkpoint that cannot be read or does not fit the model."""


class OutputError(AsagError):
    """An output file or folder that cannot (or must not) be written: under a file, unwritable, or
    holding earlier results that would be replaced."""


class NonFiniteError(AsagError, FloatingPointError):
    """Training produced NaN or infinite values: it diverged (usually a learning rate far too high)."""
