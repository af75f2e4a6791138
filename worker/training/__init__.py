"""The training engine: spec in, trained model and artifacts out. Imports neither Celery nor FastAPI."""

from worker.training.engine import StopReason, TrainingCallbacks, TrainingStopped, TrainResult, run_training

__all__ = ["StopReason", "TrainResult", "TrainingCallbacks", "TrainingStopped", "run_training"]
