"""One exception family for every user mistake, so the CLI can print it as one paragraph.

Library callers tell the kinds apart by subtype; the CLI prints any of them without a traceback
and exits with status 2.
"""


class FmergeError(Exception):
    """A problem the user can fix (bad recipe, missing file, incompatible models).

    The message must name the file, recipe key or tensor at fault. The CLI prints it without a
    traceback and exits non-zero.
    """


class RecipeError(FmergeError):
    """A recipe (or a mergekit config, a --set, a command-line option) that cannot be used as written."""


class DataError(FmergeError):
    """Task data that cannot be read, or does not hold what the recipe says (columns, labels, splits)."""


class ModelError(FmergeError):
    """Model weights or configs that cannot be read or do not fit together."""


class StoreError(FmergeError):
    """An artifact store that is missing, not a store, unwritable or damaged."""


class ExportError(FmergeError):
    """An export that would overwrite what fmerge did not write, or cannot be written."""


MAX_QUOTED = 200


def quoted(value: object, limit: int = MAX_QUOTED) -> str:
    """`repr(value)` cut to `limit` characters, for quoting user values in messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
