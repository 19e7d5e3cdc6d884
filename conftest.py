"""Repository-level pytest hooks (apply to tests/ and notebooks/)."""

from pathlib import Path


def pytest_configure(config):
    # addopts names the nbval sanitize file relative to the repo root; make it absolute so
    # pytest started from another directory still finds it
    path = getattr(config.option, "nbval_sanitize_with", None)
    if path and not Path(path).is_absolute():
        config.option.nbval_sanitize_with = str(config.rootpath / path)
