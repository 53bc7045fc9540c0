"""Python client of crossvit-serve: typed results, limits read from the server, retries on 503.

Light on purpose: httpx, pydantic and tqdm, no torch and nothing of the server: its own distribution
(client/pyproject.toml), with the wire models the server answers with (`client.wire`).
"""

from .api import AsyncClient, Client, ImageInput, Outcome
from .batching import Limits
from .errors import APIError, ClientError, ImageReadError, UnreachableError
from .retry import RetryEvent, RetryPolicy
from .wire import AgreementModel, ClassifyResponse, ImageResultModel, ModelCard, PredictionModel

__all__ = [
    "APIError",
    "AgreementModel",
    "AsyncClient",
    "ClassifyResponse",
    "Client",
    "ClientError",
    "ImageInput",
    "ImageReadError",
    "ImageResultModel",
    "Limits",
    "ModelCard",
    "Outcome",
    "PredictionModel",
    "RetryEvent",
    "RetryPolicy",
    "UnreachableError",
]
