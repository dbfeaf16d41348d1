"""The demo and its stages (``demo``, ``stages``) and the red-team factor sweep (``sweep``)."""
