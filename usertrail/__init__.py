"""usertrail: event-sourced user-interaction tracking.

The architecture's parts are subpackages: ``usertrail.producers`` (event
contract and client SDK), ``usertrail.stream`` (faust worker),
``usertrail.sink`` (PostgreSQL writer), ``usertrail.migrations`` (alembic).
This package holds what they share: settings, errors, the embedded stack and
the command line.
"""

from usertrail.errors import UsertrailError

__all__ = ["UsertrailError"]
__version__ = "0.1.0"
