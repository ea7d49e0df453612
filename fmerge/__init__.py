"""fmerge: declarative, cached, data-aware merging of fine-tuned models.

    import fmerge
    result = fmerge.merge("simple_average", ["ft/a", "ft/b"])

The API (docs/api.md) lives in fmerge.api and is imported on first use of one of its names, so
`import fmerge` stays instant and the CLI's planning commands load nothing they do not need.
"""

import sys
import types

__version__ = "0.1.0"

# Names served from fmerge.api. The import is by name (importlib), not an `import` statement: the
# package sits below every layer (tests/test_architecture.py), and this is its one lazy facade.
API_NAMES = ("merge", "fisher", "fisher_many", "evaluate", "run", "status", "load_recipe",
             "MergeResult", "FisherResult", "EvalResult", "TaskScores", "RunResult", "StatusResult", "Tensors")


def __getattr__(name: str):
    if name in API_NAMES:
        from importlib import import_module

        api = import_module("fmerge.api")
        if hasattr(api, name):
            return getattr(api, name)
    raise AttributeError(f"module 'fmerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API_NAMES])


class _Package(types.ModuleType):
    """Keeps `fmerge.fisher` the API's function once the algorithm module fmerge/fisher.py is
    imported (the import system sets a package attribute named after each submodule it loads);
    the module itself stays in sys.modules, so `from fmerge.fisher import ...` finds it."""

    def __setattr__(self, name: str, value) -> None:
        if name in API_NAMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
