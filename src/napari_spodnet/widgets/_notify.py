"""napari notifications, and the wording of errors shown to the user."""

from __future__ import annotations

from ..core.validation import SPoDInputError


def notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def error_message(exc: BaseException) -> str:
    """A message for the user: our own errors speak for themselves, others get their type."""
    if isinstance(exc, SPoDInputError):
        return str(exc)
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"
