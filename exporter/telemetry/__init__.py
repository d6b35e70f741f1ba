"""Sinks fed by finished RequestRecords: metrics (Prometheus), logs (structlog)."""
