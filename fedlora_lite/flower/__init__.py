"""Federations on Flower (``flwr``, Message API): CLAIR and the baselines as strategies, a ClientApp, runs.

Layout, in import order: ``config`` (:class:`FlowerRunConfig`, the run config a Flower app
receives) -> ``records`` (adapters as ``ArrayRecord``, screening, byte counts) ->
``client`` (the ClientApp: local LoRA training with peft on the node's copy-task data) ->
``checkpoint`` -> ``strategy`` (:class:`LoraStrategy`, the round machinery on Flower's
``FedAvg``) -> ``strategies`` (CLAIR, detect-then-average and the aggregators of
:func:`fedlora_lite.federated.aggregate` on exact products) -> ``server`` (the ServerApp)
-> ``results`` -> ``simulation`` (Flower's Ray simulation engine) and ``deploy`` (a real
SuperLink and SuperNodes as local processes; ``python -m fedlora_lite.flower``).

Needs the ``[flower]`` extra (``pip install -e ".[flower]"``).
"""

from .client import client_app, make_client_app
from .config import DOWNLINKS, FLAGGED_POLICIES, METHODS, FlowerRunConfig, paper_clair_config
from .records import ReferenceAdapter
from .results import FlowerResult
from .server import make_server_app, run_server, server_app
from .simulation import run_flower_simulation
from .strategies import ClairStrategy, DetectThenAverage, GlobalLoraStrategy, build_strategy
from .strategy import LoraStrategy

__all__ = [
    "FlowerRunConfig", "METHODS", "DOWNLINKS", "FLAGGED_POLICIES", "paper_clair_config",
    "ReferenceAdapter", "LoraStrategy", "GlobalLoraStrategy", "DetectThenAverage", "ClairStrategy", "build_strategy",
    "make_client_app", "client_app", "make_server_app", "server_app", "run_server",
    "FlowerResult", "run_flower_simulation",
]
