"""Errors that medsec reports to users as a one-line message instead of a traceback."""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("medsec")
F = TypeVar("F", bound=Callable[..., Any])


class MedsecError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing file)."""


class DataError(MedsecError, ValueError):
    """A data source found a problem in a file, row, column or split; the message names it."""


class ConfigError(MedsecError, ValueError):
    """A configuration value is missing or inconsistent; the message names the field."""


class SecurityError(MedsecError):
    """A key or integrity check failed (wrong key, tampered or truncated data); the message names
    the store, record or file, never key material."""


_REMOTE_ERROR = re.compile(r"^medsec\.errors\.\w+: (.+)$", re.MULTILINE)
"""How a MedsecError raised in a DataLoader worker reads in the traceback text handed back."""


def user_error_message(err: BaseException) -> str | None:
    """The message of the :class:`MedsecError` behind ``err``, if there is one.

    MONAI wraps transform errors in ``RuntimeError`` (keeping the cause), and DataLoader workers
    pass errors back as text only; both are searched.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MedsecError):
            return str(err)
        found = _REMOTE_ERROR.search(str(err))
        if found:
            return found.group(1)
        err = err.__cause__ or err.__context__
    return None


def user_errors_exit(func: F) -> F:
    """Turn a :class:`MedsecError` (also one raised inside a transform or a DataLoader worker) into
    one clear log line and exit status 2, with no traceback.

    ``SystemExit`` passes through Hydra untouched, so a multirun stops at the failing job and
    says why; anything else is a bug and keeps its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as err:
            message = user_error_message(err)
            if message is None:
                raise
            log.error("error: %s", message)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
