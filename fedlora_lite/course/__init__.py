"""Course tooling, apart from the library: profiles, results files, runner, CLI, plotting.

Profiles and results files (``reporting``), the notebook files (``notebooks``), the papermill
runner (``runner``; one notebook's execution in ``execution``, argument checks and interrupts
in ``run_control``, the run summary in ``summary``), the ``fedlora-lite`` command (``cli``), the
notebooks' plotting helpers (``plotting``) and live-exploration cells (``widgets``); parameter
sweeps (``sweep``, ``sweep_collect``), student/instructor editions (``editions``) and the static
HTML course (``site``); the capstone's claims-and-evidence ledger, read from the committed
notebooks (``evidence``).

Import the module you need (``from fedlora_lite.course.runner import run_notebooks``); this
package imports nothing itself, so a notebook that only plots does not load papermill.
"""
