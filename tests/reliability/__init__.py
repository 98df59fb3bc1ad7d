"""Reliability suite: chaos, broker restarts, bad input, security."""
