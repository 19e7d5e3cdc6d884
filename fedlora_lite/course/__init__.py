"""Course tooling, apart from the library: profiles, results files, runner, CLI, plotting.

Profiles and results files (``reporting``), the notebook files (``notebooks``), the papermill
runner (``runner``), the ``fedlora-lite`` command (``cli``) and the notebooks' plotting
helpers (``plotting``).

Import the module you need (``from fedlora_lite.course.runner import run_notebooks``); this
package imports nothing itself, so a notebook that only plots does not load papermill.
"""
