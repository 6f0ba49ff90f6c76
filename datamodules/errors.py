"""The one error type the data layer raises for problems a user can fix in their files or config."""


class DataError(ValueError):
    """Bad data or data config: the message names the file/key and says what to do.

    The CLI prints these without a traceback.
    """
