"""The runner's own error: a one-line problem with the configuration, the run or a stage."""


class RunnerError(Exception):
    """A problem the command line prints as one line before exiting non-zero."""
