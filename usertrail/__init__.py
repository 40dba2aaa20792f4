"""usertrail: event-sourced user-interaction tracking.

The architecture's parts are subpackages: ``usertrail.producers`` (event
contract and client SDK), ``usertrail.stream`` (faust worker),
``usertrail.sink`` (PostgreSQL writer), ``usertrail.migrations`` (alembic and
the models), ``usertrail.replay`` (replay, verify, backfill). This package
holds what they share: settings, errors, Kafka helpers, the embedded stack;
and the command line (docs/architecture.md).
"""

from importlib.metadata import PackageNotFoundError, version

from usertrail.errors import UsertrailError

__all__ = ["UsertrailError"]
try:
    __version__ = version("usertrail")  # the installed package's, as pip shows it
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
