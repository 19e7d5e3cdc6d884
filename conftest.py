"""Repository-level pytest hooks (apply to tests/ and notebooks/).

The OpenMP wait policy is set here, before anything imports torch, so that the README's
plain ``pytest`` is as fast as ``.ci/run``: with spinning idle OpenMP threads, the many
small torch operations of the solver and the notebooks run 2-3x slower on a 2-core machine.
Notebook kernels started by nbval and papermill inherit it.
"""

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# nbval and papermill kernels have no widget front end: widget cells draw one static figure
# (fedlora_lite.course.widgets)
os.environ.setdefault("FEDLORA_LITE_WIDGETS", "static")


def pytest_configure(config):
    # addopts names the nbval sanitize file relative to the repo root; make it absolute so
    # pytest started from another directory still finds it
    path = getattr(config.option, "nbval_sanitize_with", None)
    if path and not Path(path).is_absolute():
        config.option.nbval_sanitize_with = str(config.rootpath / path)


# `jupyter nbconvert --to notebook --execute` writes NN_topic.nbconvert.ipynb beside the source:
# executed copies are not part of the course, and nbval must not collect them (pytest matches
# these patterns against full paths, so they apply at any depth).
collect_ignore_glob = ["*.nbconvert.ipynb"]
