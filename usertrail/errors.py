"""One exception root for everything usertrail raises.

Every error says what to do about it; ``retriable`` tells a caller whether
trying the same thing again later can succeed.
"""

from __future__ import annotations


class UsertrailError(Exception):
    """Root of every usertrail error."""

    retriable: bool = False
    exit_code: int = 2  # what the command line exits with (README, "Exit codes")


class ConfigurationError(UsertrailError):
    """Settings or a configuration file are invalid; fix them and restart."""


class EventValidationError(UsertrailError, ValueError):
    """An event broke the contract. ``errors`` lists (field, rule) pairs."""

    def __init__(self, kind: str, errors: list[tuple[str, str]]) -> None:
        self.kind = kind
        self.errors = errors
        detail = "; ".join(f"{field}: {rule}" for field, rule in errors)
        # a NUL the event carried (in its kind, say) is written out: the
        # message is stored as text, which PostgreSQL refuses with a NUL in it
        super().__init__(f"invalid {kind} event: {detail}".replace("\x00", "\\u0000"))

    @property
    def fields(self) -> list[str]:
        return [field for field, _ in self.errors]


class BrokerUnavailableError(UsertrailError):
    """The Kafka cluster could not be reached; check bootstrap servers and retry.
    Exit code 4."""

    retriable = True
    exit_code = 4


class DatabaseUnavailableError(UsertrailError):
    """PostgreSQL could not be reached; check DATABASE_URL and retry. Exit code 5."""

    retriable = True
    exit_code = 5


class DeliveryError(UsertrailError):
    """An event was not acknowledged by the broker in time (it was spooled)."""

    retriable = True


class BufferFullError(UsertrailError):
    """The client's send buffer stayed full past its timeout: the broker is too
    slow or down. Slow down, raise ``buffer_size``, or retry later."""

    retriable = True


class ClientClosedError(UsertrailError):
    """The client is not started or already closed."""


class EmbeddedStackError(UsertrailError):
    """The embedded broker or database could not be started."""


class LogResetError(UsertrailError):
    """The log on the broker is not the one the stored positions were read
    from (a recreated topic, a wiped or restarted embedded broker, another
    cluster): going on would skip or misplace records, so the consumer stops.
    Exit code 3 (docs/log.md says what to do)."""

    exit_code = 3


class StalledError(UsertrailError):
    """A worker made no progress for ``USERTRAIL_STALL_SECONDS``: no
    partitions assigned (a group that does not form, a broker that does not
    answer) or partitions behind their end and nothing read. It exits so that
    its supervisor (``up``, systemd, Kubernetes) starts it afresh. Exit code 6."""

    exit_code = 6
