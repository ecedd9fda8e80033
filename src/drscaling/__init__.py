"""drscaling: measure scaling laws of dense retrieval and turn them into decisions."""

__version__ = "0.1.0"
