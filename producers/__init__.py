"""The usertrail client SDK and event contract.

Apps depend on this package: build events through a client's ``track_*``
methods (validated at the call) or the models in ``events``.
"""

from usertrail.producers.client import DeliveryReport, SyncTrackingClient, TrackingClient
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
