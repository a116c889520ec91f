"""The one error type of mk: a message, a hint and the exit code of the contract."""

# Exit codes of the command-line contract (README: "Exit codes").
OK = 0
RUNTIME_FAILURE = 1
BAD_INPUT = 2
GATE_FAILED = 3
INTERRUPTED = 130


class MkError(Exception):
    """A failure a user can act on: shown as `error: …` / `hint: …`, no traceback."""

    code = RUNTIME_FAILURE

    def __init__(self, message: str, hint: str | None = None, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code


class BadInput(MkError):
    """Bad usage or bad input: unreadable file, missing column, wrong artifact kind."""

    code = BAD_INPUT


class GateFailed(MkError):
    """A quality gate failed; the artifact at `path` was still written for inspection."""

    code = GATE_FAILED

    def __init__(self, message: str, path=None, hint: str | None = None, result: dict | None = None):
        super().__init__(message, hint)
        self.path = path
        self.result = result or {}
