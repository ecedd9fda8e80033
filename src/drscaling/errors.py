"""The one exception type users see: a message that names the problem and what to do."""


class DrscalingError(Exception):
    """An error caused by input or state the user controls (bad file, bad parameter, missing stage).

    The CLI prints it without a traceback and exits with status 2.
    """
