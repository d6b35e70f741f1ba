"""Routing benchmark: a discrete-event simulator driving the real policies."""
