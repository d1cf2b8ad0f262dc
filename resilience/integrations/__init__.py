"""Integrations: ASGI middleware (``asgi``) and the transactional outbox (``outbox``).

This file serves the checkout only. The modules live in its top-level ``integrations/``
folder, which a wheel installs as this package (pyproject's ``package-dir``, with
``integrations/__init__.py`` in this file's place). Searching that folder too lets Python
started in the checkout, and an editable install, import the same modules.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent.parent / "integrations"
if (_CHECKOUT / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))
