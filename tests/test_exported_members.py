"""The public surface of ``ordering_sql``: what ``__all__`` promises, and the constants."""

from __future__ import annotations

import inspect
from datetime import timedelta

import ordering_sql

#: Names that code written against the reference engine imports; they must never disappear.
CONTRACT = {
    "CausalOrdering",
    "ReceivedEvent",
    "Event",
    "Resource",
    "EventArrivedEarly",
    "EventBeingProcessed",
    "MaxDepthExceeded",
    "PRECEDING_EVENT_LOOKBACK",
    "PROCESSED_EVENT_LOOKBACK",
    "SEEN_EXPIRATION",
    "MAX_DEPTH_OF_PRECEDING_EVENT",
    "IN_FLIGHT_EVENT_TIMEOUT",
    "migrate",
    "dispose_engines",
}


def _public_names() -> set[str]:
    """Names defined in the package namespace that are meant for users (not its submodules)."""
    return {
        name
        for name, value in vars(ordering_sql).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }


def _isort_key(name: str) -> tuple[int, str]:
    # The order ruff keeps ``__all__`` in (RUF022): CONSTANTS, then Classes, then functions.
    if name.isupper():
        return 0, name
    if name[:1].isupper():
        return 1, name
    return 2, name


def test_all_lists_exactly_the_public_names() -> None:
    assert set(ordering_sql.__all__) == _public_names()


def test_all_has_no_duplicates() -> None:
    assert len(ordering_sql.__all__) == len(set(ordering_sql.__all__))


def test_all_is_sorted() -> None:
    assert ordering_sql.__all__ == sorted(ordering_sql.__all__, key=_isort_key)


def test_all_contains_the_contract_names() -> None:
    missing = CONTRACT - set(ordering_sql.__all__)
    assert not missing, f"missing from ordering_sql.__all__: {sorted(missing)}"


def test_star_import_provides_every_exported_name() -> None:
    namespace: dict[str, object] = {}
    exec("from ordering_sql import *", namespace)
    assert set(ordering_sql.__all__) <= set(namespace)


def test_constants_have_the_reference_values() -> None:
    assert timedelta(minutes=15) == ordering_sql.PRECEDING_EVENT_LOOKBACK
    assert timedelta(minutes=30) == ordering_sql.PROCESSED_EVENT_LOOKBACK
    assert timedelta(minutes=30) == ordering_sql.SEEN_EXPIRATION
    assert ordering_sql.MAX_DEPTH_OF_PRECEDING_EVENT == 20
    assert timedelta(seconds=8) == ordering_sql.IN_FLIGHT_EVENT_TIMEOUT


def test_seen_expiration_is_the_larger_lookback() -> None:
    larger = max(ordering_sql.PRECEDING_EVENT_LOOKBACK, ordering_sql.PROCESSED_EVENT_LOOKBACK)
    assert larger == ordering_sql.SEEN_EXPIRATION


def test_every_exported_exception_is_an_ordering_error() -> None:
    exceptions = [
        value
        for name in ordering_sql.__all__
        if isinstance(value := getattr(ordering_sql, name), type)
        and issubclass(value, BaseException)
    ]
    assert ordering_sql.EventArrivedEarly in exceptions
    for exc in exceptions:
        assert issubclass(exc, ordering_sql.OrderingError), exc


def test_configuration_error_is_a_value_error() -> None:
    # Callers that validate input with ``except ValueError`` keep working.
    assert issubclass(ordering_sql.ConfigurationError, ValueError)


def test_database_unavailable_is_a_store_error() -> None:
    assert issubclass(ordering_sql.DatabaseUnavailableError, ordering_sql.StoreError)


def test_public_callables_are_coroutine_functions() -> None:
    assert inspect.iscoroutinefunction(ordering_sql.migrate)
    assert inspect.iscoroutinefunction(ordering_sql.dispose_engines)


def _own_members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties ``cls`` or its ordering_sql bases define (not pydantic's)."""
    members = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("ordering_sql"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            if inspect.isfunction(value) or isinstance(value, property):
                members.append((f"{klass.__name__}.{name}", value))
    return members


def test_every_public_function_method_and_property_says_what_it_does() -> None:
    undocumented = []
    for name in ordering_sql.__all__:
        value = getattr(ordering_sql, name)
        if inspect.isclass(value):
            if not inspect.getdoc(value):
                undocumented.append(name)
            undocumented += [n for n, member in _own_members(value) if not inspect.getdoc(member)]
        elif inspect.isfunction(value) and not inspect.getdoc(value):
            undocumented.append(name)
    assert undocumented == []
