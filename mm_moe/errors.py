"""The one exception type for the user's mistakes (configuration, paths, inputs).

Entry points report a `UserError` with its message alone (exit status 2); any other exception
is a failure of the program or of what it runs on and keeps its traceback (exit status 1).
It subclasses ValueError, so code that catches ValueError still sees it.
"""


class UserError(ValueError):
    """A mistake in the configuration or the inputs; the message names the key or file and
    says what would be valid."""
