"""Two-tier cache-aside: local tier, Redis tier, serializers, keys."""

from resilience.cache.cache import CacheEvent, TwoTierCache
from resilience.cache.keys import KeyBuilder
from resilience.cache.local import LocalCache
from resilience.cache.policy import CachePolicy
from resilience.cache.redis import RedisCache
from resilience.cache.serializers import (
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    SerializationError,
    Serializer,
)

__all__ = [
    "CacheEvent",
    "CachePolicy",
    "JsonSerializer",
    "KeyBuilder",
    "LocalCache",
    "MsgpackSerializer",
    "PickleSerializer",
    "RedisCache",
    "SerializationError",
    "Serializer",
    "TwoTierCache",
]
