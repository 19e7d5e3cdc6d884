"""The federated text-copying experiment (the paper's headline experiment), end to end.

Layout, in import order: ``tokenizer`` -> ``model`` -> ``checkpoint`` (the shipped base) ->
``sequences`` (batching, accuracy, decoding) -> ``training`` -> ``pretrain`` (the base's
own training, ``python -m fedlora_lite.experiments.copy_task.pretrain``) -> ``tasks`` (the
federated task generator) -> ``config`` -> ``local`` (local LoRA fine-tuning with a cache)
-> ``evaluation`` -> ``results`` -> ``pipeline`` (:func:`run_copy_experiment`).
"""

from .checkpoint import DEFAULT_BASE_DIR, BaseCheckpoint, load_base, save_base, sha256_file, verify_checksums
from .config import BASELINES, ExperimentConfig, LocalTrainingConfig
from .evaluation import Evaluator
from .local import LocalAdapters, train_local_adapters
from .model import ModelConfig, build_model, count_parameters, max_target_length
from .pipeline import run_copy_experiment
from .pretrain import LOWERCASE, PretrainConfig, PretrainResult, load_or_pretrain, pretrain, random_copy_pairs
from .results import ExperimentResult
from .sequences import (
    SequenceBatch,
    collate,
    encode_pair,
    encode_prompt,
    greedy_decode,
    greedy_exact_match,
    sequence_loss,
    token_accuracy,
)
from .tasks import (
    CONTAMINATION_KINDS,
    CopyClient,
    CopyTaskConfig,
    FederatedCopyTask,
    apply_substitution,
    make_client_pool,
    make_copy_task,
    random_derangement,
)
from .tokenizer import CharTokenizer
from .training import TrainConfig, TrainHistory, train_on_pairs

__all__ = [
    "DEFAULT_BASE_DIR", "BaseCheckpoint", "load_base", "save_base", "sha256_file", "verify_checksums",
    "BASELINES", "ExperimentConfig", "LocalTrainingConfig", "Evaluator", "LocalAdapters", "train_local_adapters",
    "ModelConfig", "build_model", "count_parameters", "max_target_length", "run_copy_experiment",
    "LOWERCASE", "PretrainConfig", "PretrainResult", "load_or_pretrain", "pretrain", "random_copy_pairs",
    "ExperimentResult",
    "SequenceBatch", "collate", "encode_pair", "encode_prompt", "greedy_decode", "greedy_exact_match",
    "sequence_loss", "token_accuracy",
    "CONTAMINATION_KINDS", "CopyClient", "CopyTaskConfig", "FederatedCopyTask", "apply_substitution",
    "make_client_pool", "make_copy_task", "random_derangement",
    "CharTokenizer", "TrainConfig", "TrainHistory", "train_on_pairs",
]
