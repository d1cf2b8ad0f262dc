"""Permit: one admitted call, for callers that decide before they act."""

from __future__ import annotations

from resilience.breaker._async_permit import AsyncPermitOps
from resilience.breaker._sync_permit import SyncPermitOps

__all__ = ["Permit"]


class Permit(SyncPermitOps, AsyncPermitOps):
    """One admitted call, for callers that decide before they act.

    Report exactly one outcome; later reports are ignored. A permit that is never
    reported holds a half-open probe slot only until its lease runs out.
    """

    __slots__ = ()
