"""User-facing errors.

Every error a user can cause (bad checkpoint, bad prompt, bad option) is raised as a subclass of
`JaxspecError` with a message that names the file, key, shape or value at fault. The CLI prints
the message and exits non-zero; `--debug` adds the traceback.
"""


class JaxspecError(Exception):
    """Base class for errors caused by user input; the message is shown as is."""


class CheckpointError(JaxspecError):
    """A checkpoint directory or file is missing, corrupt, or does not match the model."""


class ConfigError(JaxspecError):
    """A configuration value is missing, of the wrong type, or unsupported."""


class InputError(JaxspecError):
    """A prompt, prompts file or sampling option is invalid."""
