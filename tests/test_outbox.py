"""
The per-client outbox: backpressure, superseded value previews, the bound.
"""

from contextlib import contextmanager

from funcnodes_tw.outbox import Outbox


class Recorder:
    def __init__(self, limit=100):
        self.sent = []
        self.overflows = 0
        #: What was sent in each batch (L{Outbox.release}).
        self.batches = []
        self.outbox = Outbox(self.write, limit, self.overflow, self.batch)

    def write(self, payload, is_binary):
        self.sent.append((payload, is_binary))
        if self.batches and self.batches[-1] is not None:
            self.batches[-1].append(payload)

    @contextmanager
    def batch(self):
        self.batches.append([])
        yield
        self.batches.append(None)

    def overflow(self):
        self.overflows += 1


def test_writes_straight_through_while_the_transport_keeps_up():
    r = Recorder()
    r.outbox.put(b"a", False)
    r.outbox.put(b"b", True)
    assert r.sent == [(b"a", False), (b"b", True)]
    assert r.outbox.size == 0


def test_paused_frames_wait_and_go_out_in_order_on_resume():
    r = Recorder()
    r.outbox.pauseProducing()
    r.outbox.put(b"one", False)
    r.outbox.put(b"two", True)
    assert r.sent == [] and r.outbox.size == 6
    r.outbox.resumeProducing()
    assert r.sent == [(b"one", False), (b"two", True)]
    assert r.outbox.size == 0


def test_order_is_kept_after_resume_until_the_queue_is_empty():
    r = Recorder()
    r.outbox.pauseProducing()
    r.outbox.put(b"1", False)
    r.outbox.paused = False  # resumed by the transport, queue not drained yet
    r.outbox.put(b"2", False)
    assert [p for p, _ in r.sent] == [b"1", b"2"], "a new frame may not overtake a waiting one"


def test_a_newer_preview_of_the_same_io_supersedes_the_waiting_one():
    r = Recorder()
    r.outbox.pauseProducing()
    r.outbox.put(b"v1", True, key=("n", "a"))
    r.outbox.put(b"event", False)
    r.outbox.put(b"w1", True, key=("n", "b"))
    r.outbox.put(b"v2", True, key=("n", "a"))
    assert r.outbox.size == len(b"event") + len(b"w1") + len(b"v2")
    r.outbox.resumeProducing()
    assert [p for p, _ in r.sent] == [b"event", b"w1", b"v2"]


def test_a_sent_preview_is_not_superseded_twice():
    r = Recorder()
    r.outbox.pauseProducing()
    r.outbox.put(b"v1", True, key="k")
    r.outbox.resumeProducing()
    r.outbox.pauseProducing()
    r.outbox.put(b"v2", True, key="k")
    assert r.outbox.size == 2
    r.outbox.resumeProducing()
    assert [p for p, _ in r.sent] == [b"v1", b"v2"]


def test_pausing_in_the_middle_of_a_drain_stops_it():
    r = Recorder()
    r.outbox.pauseProducing()
    for n in range(3):
        r.outbox.put(b"%d" % n, False)

    def write(payload, is_binary):
        r.sent.append((payload, is_binary))
        r.outbox.pauseProducing()  # the transport's buffer filled up again

    r.outbox._write = write
    r.outbox.resumeProducing()
    assert [p for p, _ in r.sent] == [b"0"]
    r.outbox.resumeProducing()
    assert [p for p, _ in r.sent] == [b"0", b"1"]


def test_falling_too_far_behind_overflows_once_and_frees_the_queue():
    r = Recorder(limit=10)
    r.outbox.pauseProducing()
    r.outbox.put(b"x" * 8, False)
    assert r.overflows == 0
    r.outbox.put(b"y" * 8, False)
    assert r.overflows == 1
    assert r.outbox.size == 0
    r.outbox.put(b"z", False)
    r.outbox.resumeProducing()
    assert r.overflows == 1 and r.sent == []


def test_superseding_keeps_a_chatty_io_within_the_bound():
    r = Recorder(limit=100)
    r.outbox.pauseProducing()
    for n in range(1000):
        r.outbox.put(b"%08d" % n, True, key="io")
    assert r.overflows == 0 and r.outbox.size == 8
    r.outbox.resumeProducing()
    assert r.sent == [(b"00000999", True)]


def test_held_frames_wait_for_release_and_leave_in_one_batch():
    r = Recorder()
    r.outbox.put(b"e1", False, hold=True)
    r.outbox.put(b"v1", True, key=("n", "a"), hold=True)
    assert r.sent == [] and r.outbox.size == 4
    r.outbox.release()
    assert r.sent == [(b"e1", False), (b"v1", True)]
    assert r.batches == [[b"e1", b"v1"], None]
    assert r.outbox.size == 0
    r.outbox.put(b"next", False)
    assert r.sent[-1] == (b"next", False), "nothing waits once the batch is gone"


def test_a_frame_that_does_not_hold_takes_the_held_ones_along_in_order():
    r = Recorder()
    r.outbox.put(b"event", False, hold=True)
    r.outbox.put(b"reply", False)
    assert [p for p, _ in r.sent] == [b"event", b"reply"]
    assert r.batches == [[b"event", b"reply"], None]


def test_held_previews_of_one_io_all_go_out():
    # Holding only batches the writes: every event the client would have
    # got one by one still reaches it.
    r = Recorder()
    r.outbox.put(b"v1", True, key="k", hold=True)
    r.outbox.put(b"v2", True, key="k", hold=True)
    r.outbox.release()
    assert [p for p, _ in r.sent] == [b"v1", b"v2"]


def test_held_frames_wait_for_the_transport_and_then_supersede():
    r = Recorder()
    r.outbox.put(b"v1", True, key="k", hold=True)
    r.outbox.pauseProducing()
    r.outbox.put(b"v2", True, key="k", hold=True)
    r.outbox.put(b"v3", True, key="k", hold=True)
    r.outbox.release()
    assert r.sent == [], "a full transport holds everything back"
    r.outbox.resumeProducing()
    assert [p for p, _ in r.sent] == [b"v1", b"v3"]


def test_held_frames_count_towards_the_bound():
    r = Recorder(limit=10)
    r.outbox.put(b"x" * 8, False, hold=True)
    r.outbox.put(b"y" * 8, False, hold=True)
    assert r.overflows == 1 and r.outbox.size == 0
    r.outbox.release()
    assert r.sent == []
