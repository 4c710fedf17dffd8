"""The small error hierarchy: permanent failures end a scan, transient ones are retried."""

from __future__ import annotations


class CybersecError(Exception):
    """Base of every error this project raises on purpose."""

    code = "internal_error"
    retryable = False


class PermanentError(CybersecError):
    """Retrying cannot help: bad input, a denied target, a name that does not resolve."""


class InvalidScan(PermanentError):
    code = "invalid_scan"


class TargetDenied(PermanentError):
    code = "target_denied"


class ResolutionFailed(PermanentError):
    code = "resolution_failed"


class TransientError(CybersecError):
    """A dependency blinked (broker, database, Redis); the same work may succeed later."""

    code = "unavailable"
    retryable = True
