"""Test an app's tracking without a broker: clients that validate every
event as the real ones do, send nothing, and keep what they would have
sent.

    from usertrail.producers.testing import RecordingClient

    async def test_a_reading_is_tracked() -> None:
        async with RecordingClient(source="web") as client:
            await my_app.finish_reading(client, user_id="user-42")
        assert [e.kind for e in client.events] == ["interaction"]
        assert client.events[0].service == "saju"

``SyncRecordingClient`` is the same for code without an event loop. An
invalid event raises ``EventValidationError`` at the call, as in
production.
"""

from __future__ import annotations

from typing import Any

from usertrail.producers.client import SyncTrackingClient, TrackingClient
from usertrail.producers.events import EventBase, decode
from usertrail.producers.spool import SpooledRecord


class RecordingClient(TrackingClient):
    """A disabled ``TrackingClient`` that keeps each event it was given, in
    order: ``events`` (the events as a consumer decodes them) and
    ``records`` (topic, key, value and headers, as they would be sent)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("source", "test")
        super().__init__(**{**kwargs, "disabled": True})
        self.records: list[SpooledRecord] = []

    @property
    def events(self) -> list[EventBase]:
        return [decode(record.value) for record in self.records]

    def record_unsent(self, record: SpooledRecord) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records.clear()


class SyncRecordingClient(SyncTrackingClient):
    """``RecordingClient`` for code without an event loop."""

    client_class = RecordingClient

    @property
    def events(self) -> list[EventBase]:
        return self._recording.events

    @property
    def records(self) -> list[SpooledRecord]:
        return self._recording.records

    @property
    def _recording(self) -> RecordingClient:
        client = self._client
        assert isinstance(client, RecordingClient)
        return client
