"""The HTTP collector: events from apps that cannot speak Kafka (browsers,
mobile clients, other languages), validated with the one contract and
published with the SDK's own client (``usertrail collector``)."""
