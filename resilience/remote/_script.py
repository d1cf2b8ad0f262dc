"""Lua scripts shipped as package data, run by SHA1."""

from __future__ import annotations

import hashlib
from importlib import resources

__all__ = ["Script"]


class Script:
    """A Lua script shipped as the file ``name`` of ``package``, run with EVALSHA.

    ``text`` and ``sha`` are read through importlib.resources on first use, then plain
    attributes. Redis keeps scripts by SHA1: a call sends 40 bytes instead of the text.
    On NOSCRIPT (after SCRIPT FLUSH, a restart, a failover, a node that joined),
    :meth:`Commands.evalsha` loads it (on a cluster, on every primary) and runs it once
    more. Each script touches keys of one hash slot only (its ``KEYS`` share a ``{tag}``,
    and a shard channel it publishes on is in the same slot), so it runs on Redis Cluster
    as on one server.
    """

    __slots__ = ("name", "package", "sha", "text")

    text: str
    #: The script's SHA1 (hex), as EVALSHA takes it.
    sha: str

    def __init__(self, package: str, name: str) -> None:
        self.package = package
        self.name = name

    def __getattr__(self, attribute: str) -> str:
        # Only for an attribute not set yet: text and sha, until the file is read.
        if attribute not in ("text", "sha"):
            raise AttributeError(attribute)
        try:
            text = resources.files(self.package).joinpath(self.name).read_text(encoding="utf-8")
        except OSError as error:
            # Not an OSError: to the remote guard that would look like Redis being down.
            raise RuntimeError(
                f"{self.package}/{self.name} is missing from the installed package "
                f"(package data: pyproject's [tool.setuptools.package-data]): {error}"
            ) from None
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
        return self.text if attribute == "text" else self.sha

    def __repr__(self) -> str:
        return f"Script({self.package!r}, {self.name!r})"
