"""The clock every primitive reads, for code outside the core (integrations, users).

``resilience._clock`` stays the one module that reads time; this names its public parts.
"""

from resilience._clock import SYSTEM_CLOCK, Clock, SystemClock, resolve

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "resolve"]
