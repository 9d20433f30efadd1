"""Errors that medsec reports to users as a one-line message instead of a traceback."""


class MedsecError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing file)."""


class DataError(MedsecError, ValueError):
    """A data source found a problem in a file, row, column or split; the message names it."""


class ConfigError(MedsecError, ValueError):
    """A configuration value is missing or inconsistent; the message names the field."""


class SecurityError(MedsecError):
    """A key or integrity check failed (wrong key, tampered or truncated data); the message names
    the store, record or file, never key material."""
