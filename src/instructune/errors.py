"""The errors users see, each with its exit status: bad input (2), training that diverged (3).

Anything the CLI catches besides these: an interruption (130), a file-system fault or an internal error (1)."""

EXIT_DONE, EXIT_OTHER, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class InstructuneError(Exception):
    """Bad input. `where` is a file:line, a config key or a path; the CLI prints it and exits with status 2."""

    exit_status = EXIT_BAD_INPUT

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class TrainingDiverged(InstructuneError):
    """The loss or the gradient norm stopped being a finite number: no model, evaluation or report is written."""

    exit_status = EXIT_DIVERGED
