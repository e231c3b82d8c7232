"""erasus-ray: machine unlearning at scale - coreset selection, unlearning strategies, honest evaluation, on Ray."""

from erasus_ray import fabric
from erasus_ray.continual import ContinualResult, ContinualUnlearner, UnlearningDataset
from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import (
    ErasusError,
    InvalidConfigError,
    InvalidDataError,
    NonFiniteLossError,
    NonFiniteWeightsError,
    TaskMismatchError,
    UnknownNameError,
)
from erasus_ray.evaluation import evaluate
from erasus_ray.selectors import SELECTORS, Coreset, Selector
from erasus_ray.strategies import STRATEGIES, Strategy
from erasus_ray.tasks import CausalLMTask, ClassificationTask, Task, get_task
from erasus_ray.training_sisa import SISAEnsemble, SISATrainer
from erasus_ray.runner_io import RunnerConfig
from erasus_ray.settings import ExecutionConfig
from erasus_ray.unlearner import ErasusUnlearner, MultimodalUnlearner, UnlearningResult
from erasus_ray.module import Callback, TrainerResult, UnlearningModule, UnlearningTrainer
from erasus_ray.strategies.pipeline import StrategyPipeline

__version__ = "0.1.0"

__all__ = [
    "SELECTORS",
    "STRATEGIES",
    "CausalLMTask",
    "ClassificationTask",
    "ContinualResult",
    "ContinualUnlearner",
    "Coreset",
    "ErasusError",
    "ErasusUnlearner",
    "MultimodalUnlearner",
    "ExecutionConfig",
    "IdDataset",
    "InvalidConfigError",
    "InvalidDataError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "SISAEnsemble",
    "SISATrainer",
    "Selector",
    "RunnerConfig",
    "Strategy",
    "Task",
    "TaskMismatchError",
    "UnknownNameError",
    "UnlearningDataset",
    "UnlearningResult",
    "Callback",
    "StrategyPipeline",
    "TrainerResult",
    "UnlearningModule",
    "UnlearningTrainer",
    "as_id_dataset",
    "evaluate",
    "fabric",
    "get_task",
]
