"""The database behind the engine: shared engines, the protocol's steps, retries, error mapping.

A ``Store`` (``_store.py``) is one ``AsyncEngine`` (one connection pool), its backend's steps
(``_steps.py``, ``postgres.py``, ``sqlite.py``) and the connections they run on. Every
``CausalOrdering`` on the same URL and event loop shares one Store (``_sharing.py``).
"""

from ordering_sql.store._sharing import acquire_store, dispose_engines, release_store
from ordering_sql.store._store import AUTO_PURGE_BATCH, MAX_ATTEMPTS, Store

__all__ = [
    "AUTO_PURGE_BATCH",
    "MAX_ATTEMPTS",
    "Store",
    "acquire_store",
    "dispose_engines",
    "release_store",
]
