"""User-facing errors: the CLI prints their message on one line and exits 2, no traceback."""


class NetmendError(Exception):
    """A problem with the user's input (file, name, shape, data); never a bug in netmend."""


def require(condition: bool, message: str) -> None:
    """Raise a NetmendError with `message` unless `condition` holds."""
    if not condition:
        raise NetmendError(message)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line user errors."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
