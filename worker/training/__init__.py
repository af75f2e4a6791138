"""The training engine: spec in, trained model and artifacts out. Imports neither Celery nor FastAPI."""

from worker.training.checkpoint import CheckpointKind
from worker.training.contract import StopReason, TrainingCallbacks, TrainingStopped, TrainResult
from worker.training.engine import run_training

__all__ = ["CheckpointKind", "StopReason", "TrainResult", "TrainingCallbacks", "TrainingStopped", "run_training"]
