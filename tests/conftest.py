"""
Fixtures shared by the test modules.
"""

import pytest


@pytest.fixture
def clean_reactor():
    """
    Fail a test that leaves timers or connections on the real reactor.
    """
    from twisted.internet import reactor  # pytest-twisted installs it first

    calls = set(reactor.getDelayedCalls())
    selectables = _selectables(reactor)
    yield
    left = [c for c in reactor.getDelayedCalls() if c.active() and c not in calls]
    left += list(_selectables(reactor) - selectables)
    assert not left, f"left on the reactor: {left}"


def _selectables(reactor):
    # The reactor's own wakers appear when it starts, which may be during a test.
    everything = set(reactor.getReaders()) | set(reactor.getWriters())
    return {s for s in everything if not type(s).__name__.endswith("Waker")}
