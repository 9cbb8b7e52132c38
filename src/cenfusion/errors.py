"""The one exception type for bad user input.

Raised with a single line naming the file, flag or sample at fault and what was expected;
the CLI prints it without a traceback and exits with status 2.
"""


class CenError(Exception):
    """Bad input or configuration, explained in one line."""


class ForeignCheckpointError(CenError):
    """A readable file that is not a cenfusion checkpoint (e.g. a released CEN ``.pth.tar``)."""
