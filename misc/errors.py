"""The one exception type for bad input: scripts print its message on one line and exit 2."""


class SaticError(Exception):
    """A user-facing error: the message names the file or flag and says what to do."""


class CheckpointError(SaticError):
    """A save that could not (or must not) be written; the folder keeps its previous checkpoint."""
