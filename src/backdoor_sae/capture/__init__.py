"""Capture activations once, for many hooks, into a labelled disk-backed store (``activations``, ``store``)."""
