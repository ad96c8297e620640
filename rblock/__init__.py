"""rblock: a replicated block device served over NBD."""

__version__ = "0.1.0"
