"""Serving a trained run: merged model, item index, top-k API and HTTP endpoint."""

from fedrec.serving.recommender import (
    EmptyHistoryError,
    Recommendation,
    Recommender,
    ServingError,
    UnknownItemError,
    UnknownUserError,
)
from fedrec.serving.trained import RunDirectoryError, TrainedModel, load_trained

__all__ = [
    "EmptyHistoryError",
    "Recommendation",
    "Recommender",
    "RunDirectoryError",
    "ServingError",
    "TrainedModel",
    "UnknownItemError",
    "UnknownUserError",
    "load_trained",
]
