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


# --------------------------------------------------------------------------- library errors
#
# The one table from the exceptions of the libraries mk drives to mk's errors. An
# exception is matched by its class (module prefix and class name, along its MRO) so
# that nothing here imports a heavy library, and nothing anywhere decides behaviour
# by reading an exception's text; the library's own message is kept, cut to its
# first line, after the place and the action that failed.

# (module prefix, class name, exit code, hint or None)
LIBRARY_ERRORS = (
    ("safetensors", "SafetensorError", BAD_INPUT, "the weights file is truncated or not safetensors"),
    ("google.protobuf", "DecodeError", BAD_INPUT, "the file is truncated or not an ONNX model"),
    ("onnx", "ValidationError", BAD_INPUT, None),
    ("onnxruntime", "InvalidProtobuf", BAD_INPUT, "the file is truncated or not an ONNX model"),
    ("onnxruntime", "InvalidGraph", BAD_INPUT, None),
    ("onnxruntime", "NoSuchFile", BAD_INPUT, None),
    ("onnxruntime", "InvalidArgument", BAD_INPUT, None),
    ("onnxruntime", "Fail", BAD_INPUT, None),
    ("polars", "PolarsError", BAD_INPUT, None),
    ("builtins", "UnicodeDecodeError", BAD_INPUT,
     "name the file's encoding with --encoding, or pass --encoding-errors replace"),
    ("builtins", "OSError", BAD_INPUT, None),
)


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (the class name when it has none)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def _library_entry(e: BaseException):
    """The table's row for `e`: its class or the nearest base the table names."""
    for cls in type(e).__mro__:
        module = cls.__module__ or ""
        for prefix, name, code, hint in LIBRARY_ERRORS:
            if cls.__name__ == name and (module == prefix or module.startswith(prefix + ".")):
                return code, hint
    return None


def library_error(e: BaseException, where, action: str, code: int = BAD_INPUT) -> MkError:
    """`where: action (message)` with the exit code and hint of the table's row for
    `e`'s class. A class the table does not name is named in the message and takes
    `code`: the caller caught it at a boundary where it means bad input, by default."""
    if isinstance(e, MkError):
        return e
    entry = _library_entry(e)
    if entry is None:
        message, hint = f"{where}: {action} ({type(e).__name__}: {first_line(e)})", None
    else:
        (code, hint), message = entry, f"{where}: {action} ({first_line(e)})"
    return BadInput(message, hint) if code == BAD_INPUT else MkError(message, hint, code)
