"""usertrail: event-sourced user-interaction tracking.

The architecture's parts are subpackages: ``usertrail.producers`` (event
contract and client SDK), ``usertrail.stream`` (faust worker),
``usertrail.sink`` (PostgreSQL writer), ``usertrail.migrations`` (alembic and
the models), ``usertrail.replay`` (replay, verify, backfill). This package
holds what they share: settings, errors, Kafka helpers, the embedded stack;
and the command line (docs/architecture.md).
"""

from usertrail.errors import UsertrailError

__all__ = ["UsertrailError"]
__version__ = "0.1.0"
