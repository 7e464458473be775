"""The exceptions napari-mris shows to users.

Library errors (pydicom, SimpleITK, torch, ...) are caught where they happen and re-raised as one of
these, with a message that names the file or prompt and says what is wrong in plain words.
"""

import logging

log = logging.getLogger(__name__)


class MRISError(Exception):
    """Base class for every error napari-mris reports to a user."""


class ImageReadError(MRISError):
    """A file could not be read as an image (missing, truncated, corrupt, no pixel data)."""


class UnsupportedImageError(MRISError):
    """A file was read but holds something the tool cannot segment (e.g. 4 channels, a volume)."""


class ExportError(MRISError):
    """Labels could not be written in the requested format."""


class ModelDirectoryError(MRISError):
    """A model directory is missing, partial, or its files do not match each other."""


class PromptError(MRISError):
    """A prompt cannot be used (empty, or only whitespace/punctuation)."""


class DatasetError(MRISError):
    """A dataset folder is not in the LViT layout, or none of its pairs could be used."""


def user_message(exc: BaseException, context: str) -> str:
    """The line a user sees for an error from a worker: an MRISError's own message; anything else is a bug,
    logged with its traceback and shown with `context`, its type and its text."""
    if isinstance(exc, MRISError):
        return str(exc)
    log.error("%s", context, exc_info=exc)
    return f"{context}: {type(exc).__name__}: {exc}"
