"""Integrations: ASGI middleware (``asgi``) and the transactional outbox (``outbox``).

Installed as ``resilience.integrations``. Keep code out of this file: in a checkout,
``resilience/integrations/__init__.py`` stands in for it.
"""
