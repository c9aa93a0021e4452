"""User-facing errors: the CLI prints their message on one line and exits 2, no traceback."""


class NetmendError(Exception):
    """A problem with the user's input (file, name, shape, data); never a bug in netmend."""


def require(condition: bool, message: str) -> None:
    """Raise a NetmendError with `message` unless `condition` holds."""
    if not condition:
        raise NetmendError(message)
