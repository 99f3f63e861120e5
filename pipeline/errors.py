"""The one exception type the stages turn into a one-line message."""


class PipelineError(Exception):
    """Bad input or configuration; the message is shown to the user as one line, without a traceback."""
