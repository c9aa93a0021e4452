"""Imports every module of the packages that register components, so that a new method, localiser, repairer,
defect, dataset or architecture is one new file in its package (registering itself), with no list to edit."""
import importlib
import pkgutil

from . import methods  # noqa: F401  (the presets of the baselines)

PACKAGES = ("zoo", "data", "defects", "locate", "repair")

for _package in PACKAGES:
    _pkg = importlib.import_module(f"{__package__}.{_package}")
    for _info in sorted(pkgutil.iter_modules(_pkg.__path__), key=lambda i: i.name):
        if not _info.name.startswith("_"):
            importlib.import_module(f"{_pkg.__name__}.{_info.name}")
