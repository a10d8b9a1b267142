"""The one error type users see: bad input, said with where it was found and what was expected."""


class InstructuneError(Exception):
    """Bad input. `where` is a file:line, a config key or a path; the CLI prints it and exits with status 2."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
