"""The one exception type that means "the user's input is wrong", shown without a traceback."""


class UserError(Exception):
    """Bad input: a params field, a data file, a model. The message names it and says what to do.

    The command line prints the message alone and exits with code 2.
    """


class GateFailed(Exception):
    """The quantized model missed the quality gate in `verify`; the report was still written."""


class NightlyFailed(Exception):
    """At least one model of the nightly failed or regressed; the message says which."""
