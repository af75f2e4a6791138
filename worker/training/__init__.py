"""The training engine: spec in, trained model and artifacts out. Imports neither Celery nor FastAPI."""

from worker.training.engine import TrainingCallbacks, TrainResult, run_training

__all__ = ["TrainResult", "TrainingCallbacks", "run_training"]
