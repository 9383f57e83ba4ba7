"""The one error type every converter failure is reported with."""


class ConversionError(Exception):
    """A checkpoint could not be converted; the message is one line that says why."""
