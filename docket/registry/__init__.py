"""docket-registry: the Flask application factory (``factory.py``: ``create_app(config)``).

``create_app(config)`` builds every component (``components.build``: blob store, database migrated to head,
tracker and seeder objects) without starting any process and keeps them in ``app.extensions["docket"]``; the
serve command (``cli.py``) starts tracker, seeders and GC.

``create_app`` and ``RegistryConfig`` are imported on first use (PEP 562): importing one module of the package
(``docket agent`` uses ``server.py`` and ``bodies.py``) does not load the whole registry (SQLAlchemy, alembic, every
blueprint: ~33 MB of the agent's memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from docket.registry.config import RegistryConfig
    from docket.registry.factory import create_app

__all__ = ["RegistryConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from docket.registry.factory import create_app

        return create_app
    if name == "RegistryConfig":
        from docket.registry.config import RegistryConfig

        return RegistryConfig
    raise AttributeError(f"module 'docket.registry' has no attribute {name!r}")
