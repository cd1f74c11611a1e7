"""The one exception type a user should ever see from babysit."""


class BabysitError(Exception):
    """Bad input from the user (a config field, a data file, a run id).

    The message is a single paragraph that names the file or field and what was
    expected; the CLI prints it without a traceback and exits with status 2.
    """
