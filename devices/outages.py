"""A lost dependency as the domain error :class:`vpp.errors.Unavailable`, naming it.

The one translation from the libraries' connection failures (database and state store:
``store.outages``; the broker: credential changes and MQTT publishes, here) to
``Unavailable(dependency=…)``. The API answers it with ``503``, a ``Retry-After`` and the
service's error body; background components use ``dependency_down`` to log an outage as one
line rather than a traceback.
"""

from __future__ import annotations

from devices.credentials import CredentialError
from store.outages import OUTAGE_TYPES as STORE_OUTAGE_TYPES
from store.outages import dependency_down as store_dependency_down
from store.outages import raised_in
from vpp.errors import Unavailable

BROKER = "broker"
RETRY_AFTER_S = 5  # seconds: reconnects back off from 1 s, a restarted server is up in a few

OUTAGE_TYPES: tuple[type[Exception], ...] = (*STORE_OUTAGE_TYPES, CredentialError)

_BROKER_MODULES = ((("paho", "aiomqtt", "devices.mqtt", "devices.credentials"), BROKER),)

_WHAT = {
    "database": "not reachable; nothing was changed, try again shortly",
    "state_store": "not reachable; try again shortly",
    BROKER: "not reachable; nothing was changed, try again shortly",
}


def dependency_down(exc: BaseException) -> str | None:
    """``database``, ``state_store`` or ``broker`` when ``exc`` is the loss of that
    dependency; None otherwise."""
    if isinstance(exc, Unavailable):
        return exc.dependency
    found = store_dependency_down(exc)
    if found is not None:
        return found
    if isinstance(exc, CredentialError):
        return BROKER
    if isinstance(exc, OSError):
        return raised_in(exc, _BROKER_MODULES)
    return None


def as_unavailable(exc: BaseException) -> Unavailable | None:
    """``exc`` as ``Unavailable`` naming its dependency, or None if it is no outage."""
    if isinstance(exc, Unavailable):
        return exc
    dependency = dependency_down(exc)
    if dependency is None:
        return None
    return Unavailable.of(dependency, _WHAT.get(dependency, "not reachable"), RETRY_AFTER_S)
