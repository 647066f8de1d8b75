"""The errors olmo_fast raises for bad user input, in a module of their own so that every module can raise them
without importing the module that owns the concept (`config.py` re-exports ConfigError, `checkpoint.py`
CheckpointError)."""


class ConfigError(ValueError):
    """A configuration that cannot describe an OLMo model."""


class CheckpointError(ValueError):
    """A checkpoint that is missing tensors, has mis-shaped ones, or cannot be read."""
