"""The usertrail client SDK and event contract.

Apps depend on this package: build events through a client's ``track_*``
methods (validated at the call) or the models in ``events``.
"""

from typing import TYPE_CHECKING, Any

from usertrail.producers.events import (
    Event,
    EventBase,
    Interaction,
    OnboardingCompleted,
    PreferencesUpdated,
    UserErased,
    decode,
    encode,
)
from usertrail.producers.ids import uuid7

from usertrail.errors import (
    BrokerUnavailableError,
    BufferFullError,
    ClientClosedError,
    DeliveryError,
    EventValidationError,
    UsertrailError,
)

if TYPE_CHECKING:
    from usertrail.producers.client import DeliveryReport, SyncTrackingClient, TrackingClient

_CLIENTS = ("TrackingClient", "SyncTrackingClient", "DeliveryReport")


def __getattr__(name: str) -> Any:
    """The clients (and aiokafka with them) load on first use: the contract
    alone (``usertrail.producers.events``) imports no Kafka client."""
    if name in _CLIENTS:
        from usertrail.producers import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # clients
    "TrackingClient",
    "SyncTrackingClient",
    "DeliveryReport",
    # the contract
    "Event",
    "EventBase",
    "Interaction",
    "PreferencesUpdated",
    "OnboardingCompleted",
    "UserErased",
    "encode",
    "decode",
    "uuid7",
    # errors
    "UsertrailError",
    "EventValidationError",
    "BrokerUnavailableError",
    "BufferFullError",
    "ClientClosedError",
    "DeliveryError",
]
