"""What the engine reports to OpenTelemetry: counters of outcomes, step latencies, a span per event.

Through ``opentelemetry-api`` only, so it costs next to nothing and records nothing unless the
application installs an SDK (a ``MeterProvider`` and a ``TracerProvider``); the instruments are
made once, at import, on the global providers, which forward to whatever SDK is installed later.

Metrics (every one carries ``ordering_sql.scope``):

===========================================  =========  ===================================
``ordering_sql.events.handled``              counter    events whose handling was recorded
``ordering_sql.events.parked``               counter    events parked to wait for a leader
``ordering_sql.events.replayed``             counter    followers handed to the handler by
                                                        their leader's completion
``ordering_sql.events.duplicates``           counter    events refused because already seen
``ordering_sql.events.busy``                 counter    events refused because another worker
                                                        holds them
``ordering_sql.followers.lost``              counter    followers handed out by
                                                        ``get_lost_followers``
``ordering_sql.leases.lost``                 counter    results not recorded because another
                                                        worker took the lease over
``ordering_sql.step.duration``               histogram  seconds per protocol step, by
                                                        ``ordering_sql.step``
``ordering_sql.follower.wait.duration``      histogram  seconds from a follower's ``received``
                                                        to its replay
===========================================  =========  ===================================

Spans: ``ordering_sql.handle`` around each ``preceding_event_confirmed`` and ``exactly_once``
(the handler's block, and the replays of the followers it releases, run inside it), with
``ordering_sql.scope``, ``ordering_sql.event.id``, ``ordering_sql.event.follows``,
``ordering_sql.action`` and ``ordering_sql.outcome``: ``handled``, ``parked``, ``duplicate``,
``busy``, ``max_depth``, ``lease_lost`` or ``error`` (the last two with the span's status set
to ERROR and the exception recorded).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, Literal
from uuid import UUID

from opentelemetry import metrics, trace
from opentelemetry.trace import Status, StatusCode

from ordering_sql._version import __version__
from ordering_sql.errors import (
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    MaxDepthExceeded,
)

__all__ = ["Outcome", "count", "handling", "leases_lost", "lost_followers", "step_took", "waited"]

Outcome = Literal["handled", "parked", "replayed", "duplicates", "busy"]

_NAME: Final = "ordering_sql"
_meter = metrics.get_meter(_NAME, __version__)
_tracer = trace.get_tracer(_NAME, __version__)

_EVENTS: Final = {
    "handled": "Events whose handling was recorded (marked seen)",
    "parked": "Events parked to wait for their leader",
    "replayed": "Followers handed to the handler by their leader's completion",
    "duplicates": "Events refused because they were handled already",
    "busy": "Events refused because another worker holds them",
}
_COUNTERS: Final = {
    outcome: _meter.create_counter(f"ordering_sql.events.{outcome}", "{event}", description)
    for outcome, description in _EVENTS.items()
}
_LOST_FOLLOWERS: Final = _meter.create_counter(
    "ordering_sql.followers.lost", "{event}", "Followers handed out by get_lost_followers"
)
_LEASES_LOST: Final = _meter.create_counter(
    "ordering_sql.leases.lost", "{event}", "Results not recorded: the lease was taken over"
)
_STEPS: Final = _meter.create_histogram(
    "ordering_sql.step.duration", "s", "Seconds per protocol step, merging and retries included"
)
_WAITED: Final = _meter.create_histogram(
    "ordering_sql.follower.wait.duration", "s", "Seconds from a follower's receipt to its replay"
)
_SPAN_OUTCOME: Final = "ordering_sql.outcome"


def count(outcome: Outcome, scope: str, n: int = 1) -> None:
    """Count ``n`` events of ``outcome``; a refusal also marks the current handling span."""
    if n <= 0:
        return
    _COUNTERS[outcome].add(n, {"ordering_sql.scope": scope})
    if outcome in ("duplicates", "busy"):
        span = trace.get_current_span()
        span.set_attribute(_SPAN_OUTCOME, "duplicate" if outcome == "duplicates" else "busy")


def lost_followers(scope: str, n: int) -> None:
    if n > 0:
        _LOST_FOLLOWERS.add(n, {"ordering_sql.scope": scope})


def leases_lost(scope: str, n: int = 1) -> None:
    _LEASES_LOST.add(n, {"ordering_sql.scope": scope})


def step_took(step: str, scope: str, seconds: float) -> None:
    _STEPS.record(seconds, {"ordering_sql.step": step, "ordering_sql.scope": scope})


def waited(scope: str, seconds: float) -> None:
    _WAITED.record(max(0.0, seconds), {"ordering_sql.scope": scope})


@contextmanager
def handling(scope: str, event_id: UUID, follows: UUID | None, action: str) -> Iterator[None]:
    """The span of one event's handling through ``action``; its outcome is set on the way out
    (a refusal sets its own, see ``count``)."""
    attributes: dict[str, str] = {
        "ordering_sql.scope": scope,
        "ordering_sql.event.id": str(event_id),
        "ordering_sql.action": action,
    }
    if follows is not None:
        attributes["ordering_sql.event.follows"] = str(follows)
    # The engine's refusals are outcomes, not failures: the span's status and exception events
    # are set here, for the errors only.
    with _tracer.start_as_current_span(
        "ordering_sql.handle",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except EventArrivedEarly:
            span.set_attribute(_SPAN_OUTCOME, "parked")
            raise
        except MaxDepthExceeded:
            span.set_attribute(_SPAN_OUTCOME, "max_depth")
            raise
        except EventBeingProcessed:
            raise  # ``count`` set it: duplicate or busy
        except BaseException as exc:
            span.set_attribute(
                _SPAN_OUTCOME, "lease_lost" if isinstance(exc, LeaseLostError) else "error"
            )
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        span.set_attribute(_SPAN_OUTCOME, "handled")
