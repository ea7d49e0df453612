"""One exception type for every user mistake, so the CLI can print it as one paragraph."""


class FmergeError(Exception):
    """A problem the user can fix (bad recipe, missing file, incompatible models).

    The message must name the file, recipe key or tensor at fault. The CLI prints it without a
    traceback and exits non-zero.
    """
