"""The error type for bad data (unreadable media, impossible sizes, inconsistent placeholders)."""


class DataError(ValueError):
    """A problem with one input example; the message names the example or file. The data pipeline either
    raises it or skips the example and counts it, by policy."""
