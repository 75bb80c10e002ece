"""Discrete-event cluster simulator driving the real policies."""
