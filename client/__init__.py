"""Python client of crossvit-serve: typed results, limits read from the server, retries on 503.

Light on purpose: httpx and pydantic (the response models in `service.schemas`), no torch.
"""

from service.schemas import AgreementModel, ClassifyResponse, ImageResultModel, ModelCard, PredictionModel

from .api import AsyncClient, Client, ImageInput, Outcome
from .batching import Limits
from .errors import APIError, ClientError, ImageReadError, UnreachableError
from .retry import RetryEvent, RetryPolicy

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
