"""Path normalisation where user-given paths enter the program.

Orbax refuses relative checkpoint paths ("Checkpoint path should be absolute"), and a
relative path also changes meaning if anything changes the working directory. Every entry
point passes its paths through `absolute` once, so the rest of the code sees absolute ones.
"""

import os
import re

from etils import epath

# A URL scheme such as gs://, s3://, file:// (at least two letters, so "C:" is not one).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a remote location (gs://bucket/x) rather than a local file."""
    return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike) -> epath.Path:
    """Returns `path` as an absolute epath.Path: `~` expanded, relative to the cwd; URLs kept.

    `gs://...` and other URLs are returned unchanged (they are already absolute).
    """
    text = os.fspath(path)
    if not text:
        raise ValueError("an empty string is not a path")
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
