"""Typed errors. A `UserError` is a mistake the user can fix; the CLI prints it as one line and
exits with code 2 instead of showing a traceback."""


class UserError(Exception):
    """Bad input from the user: a path, a name, a config value, an unusable dataset."""


class ConfigError(UserError):
    """A configuration value is out of range or of the wrong kind."""


class DatasetError(UserError):
    """The dataset cannot be used as given (missing, empty, one class, too few images)."""


class ImageDecodeError(Exception):
    """A file could not be turned into pixels. Carries the file name so warnings can list it, and
    a kind: "unsupported" (not an image, or a format pixclass does not open), "too_large" (over the
    pixel limit, judged from the header) or "corrupt" (a supported image that fails to decode)."""

    def __init__(self, path, reason: str, kind: str = "corrupt"):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")


def first_line(exc: BaseException) -> str:
    """A one-line description of `exc` for a UserError or a warning: the first non-empty line of
    its message (library errors often append pages of detail), else its type name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
