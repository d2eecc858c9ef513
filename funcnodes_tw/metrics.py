"""
The worker's metrics: plain counters on the hot path, Prometheus at a scrape.

Counting is an integer or list increment where it happens (a node
triggered, a save), on the connection that sent a frame (summed when
scraped), or per read from a client's socket for the commands it brought
(L{Read}); gauges (clients, queues, parked bytes, busy children) are read
when scraped. C{prometheus_client} is imported only at the first scrape (it
costs about 1 MB of an idle worker's memory) unless a host application
hands over its own registry: L{Collector} then turns the counters into its
metric families, and its C{generate_latest} writes the exposition.
"""

from bisect import bisect_left
from collections import Counter
from time import perf_counter

from funcnodes_tw import isolation

#: Seconds: commands, from the read that brought them to their reply leaving.
COMMAND_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)
#: Seconds: node triggers and saves.
SLOW_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Why the worker closed a client, by the close code it sent.
CUT_OFF_REASONS = {
    1001: "going_away",
    1002: "protocol_error",
    1007: "invalid_utf8",
    1009: "message_too_big",
    4008: "too_slow",
}
PREFIX = "funcnodes_"
#: The label of a command name the worker does not know: names come from
#: clients, and each distinct label is a time series.
UNKNOWN_COMMAND = "unknown"


class Histogram:
    """
    Counts per bucket (not cumulative) and their sum.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value, times=1):
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def buckets(self):
        """
        Cumulative C{(le, count)} pairs, as Prometheus histograms give them.
        """
        total, pairs = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += count
            pairs.append((bound, total))
        return pairs

    def exposed(self):
        return self.buckets(), self.sum


class CommandStats(Histogram):
    """
    One command's latency histogram, and how many of its calls failed by
    outcome: the rest were C{ok}, so the common case counts nothing more.
    """

    __slots__ = ("failed",)

    def __init__(self):
        super().__init__(COMMAND_BUCKETS)
        self.failed = {}  # outcome -> count


class Read:
    """
    One read from a client's socket, and when it was read: its commands are
    timed from then. Those replied while it is handled are noted by name and
    timed together when it is done, as their replies leave then (corked, see
    L{funcnodes_tw.protocol}); one replied later is timed on its own.

    @ivar open: whether it is still being handled.
    """

    __slots__ = ("at", "replied", "open")

    def __init__(self, at, open=True):
        self.at = at
        self.replied = []
        self.open = open


class Metrics:
    """
    What one worker counts. The service reads the gauges from its parts.
    """

    def __init__(self, known_commands=()):
        """
        @param known_commands: the command names to label by (a live
            mapping works); any other name is counted as L{UNKNOWN_COMMAND}.
        """
        self.known_commands = known_commands
        #: Known names and L{UNKNOWN_COMMAND} only -> L{CommandStats}.
        self.command_seconds = {}
        #: kind -> [messages, bytes]: large messages, and what closed
        #: connections sent (open ones count their own, L{sent_now}).
        self.sent = {"json": [0, 0], "binary": [0, 0], "large": [0, 0]}
        self.cut_off = {}  # reason -> count
        self.triggers = 0
        self.trigger_errors = 0
        self.trigger_seconds = Histogram(SLOW_BUCKETS)
        self._triggering = {}  # node uuid -> perf_counter at triggerstart
        self.saves = 0
        self.save_failures = 0
        self.save_seconds = Histogram(SLOW_BUCKETS)
        #: Set by L{funcnodes_tw.watch.ReactorWatch}.
        self.watch = None

    def command(self, name, outcome, started):
        """
        One reply, now, to a command that came at C{started} (C{perf_counter}).
        """
        stats = self.command_stats(name)
        stats.observe(perf_counter() - started)
        if outcome != "ok":
            stats.failed[outcome] = stats.failed.get(outcome, 0) + 1

    def read_done(self, read):
        """
        A L{Read} was handled: time the replies sent meanwhile, all alike.
        """
        read.open = False
        names = read.replied
        if not names:
            return
        seconds = perf_counter() - read.at
        if names.count(names[0]) == len(names):  # one name, as pipelines and the UI send
            self.command_stats(names[0]).observe(seconds, len(names))
            return
        for name, times in Counter(names).items():  # a Counter costs more than the count
            self.command_stats(name).observe(seconds, times)

    def command_stats(self, name):
        """
        The L{CommandStats} of a command name a client sent.
        """
        try:
            return self.command_seconds[name]
        except (KeyError, TypeError):  # first call, a name we do not know, or a list
            pass
        if not (isinstance(name, str) and name in self.known_commands):
            name = UNKNOWN_COMMAND
        stats = self.command_seconds.get(name)
        if stats is None:
            stats = self.command_seconds[name] = CommandStats()
        return stats

    @property
    def commands(self):
        """
        C{{(name, outcome): count}} of the replies so far.
        """
        counts = {}
        for name, stats in self.command_seconds.items():
            ok = sum(stats.counts) - sum(stats.failed.values())
            if ok:
                counts[name, "ok"] = ok
            for outcome, n in stats.failed.items():
                counts[name, outcome] = n
        return counts

    def connection_closed(self, connection):
        """
        Keep what a connection sent (L{WorkerProtocol.sent}) in the totals.
        """
        _add_sent(self.sent, connection)

    def sent_now(self, connections):
        """
        C{{kind: [messages, bytes]}}: the totals and what open connections sent.
        """
        now = {kind: list(counts) for kind, counts in self.sent.items()}
        for connection in connections:
            _add_sent(now, connection)
        return now

    def parked(self, size):
        """
        A text message went out as a C{large_message} pointer instead.
        """
        counts = self.sent["large"]
        counts[0] += 1
        counts[1] += size

    def closed(self, code):
        reason = CUT_OFF_REASONS.get(code, code)
        self.cut_off[reason] = self.cut_off.get(reason, 0) + 1

    def node_event(self, event, node):
        """
        One of L{funcnodes_tw.worker.TRIGGER_EVENTS}: C{triggerfast} (nodes
        funcnodes-core runs as fast) has no end event, so is not timed.
        """
        if event == "triggerstart":
            self.triggers += 1
            self._triggering[node] = perf_counter()
        elif event == "triggerfast":
            self.triggers += 1
        elif event == "triggerdone":
            started = self._triggering.pop(node, None)
            if started is not None:
                self.trigger_seconds.observe(perf_counter() - started)
        else:
            self.trigger_errors += 1

    def saved(self, started, failed):
        self.saves += 1
        self.save_failures += failed
        self.save_seconds.observe(perf_counter() - started)


def _add_sent(totals, connection):
    for kind, (messages, size) in zip(("json", "binary"), connection.sent):
        totals[kind][0] += messages
        totals[kind][1] += size


def pool_busy():
    """
    Children of the process pool running a call now (0 without a pool).
    """
    pool = isolation._pool
    return 0 if pool is None else len(pool.children) - len(pool.idle)


def cluster_tasks():
    """
    Calls sent to a Dask cluster and not back yet (0 without a cluster).
    """
    return sum(remote.in_flight for remote in isolation.remotes)


class Collector:
    """
    A C{prometheus_client} collector of one worker's L{Metrics} and gauges.

    @param gauges: the service's scrape-time readings: a callable returning
        C{clients}, C{largest_queue}, C{parked_bytes} and C{sent}
        (L{Metrics.sent_now}).
    @param labels: constant labels (C{worker} when several workers share a
        host's registry).
    """

    def __init__(self, metrics, gauges, labels=None):
        self.metrics = metrics
        self.gauges = gauges
        self.labels = dict(labels or {})

    def collect(self):
        from prometheus_client.core import CounterMetricFamily as Counter
        from prometheus_client.core import GaugeMetricFamily as Gauge
        from prometheus_client.core import HistogramMetricFamily as HistogramFamily

        m, gauges = self.metrics, self.gauges()
        sent = sorted(gauges["sent"].items())
        yield self._one(Gauge, "clients", "Connected WebSocket clients.", gauges["clients"])
        yield self._by(
            Counter, "commands", "RPC commands by name and outcome.", ("command", "outcome"),
            sorted(m.commands.items()),
        )
        yield self._by(
            HistogramFamily, "command_duration_seconds", "Command time, frame to reply.",
            ("command",), sorted((name, h.exposed()) for name, h in m.command_seconds.items()),
        )
        yield self._by(
            Counter, "sent_messages",
            "Messages sent to clients by kind (large: text parked for GET /message/).",
            ("kind",), [(kind, counts[0]) for kind, counts in sent],
        )
        yield self._by(
            Counter, "sent_bytes", "Bytes sent to clients by kind (large: the parked text).",
            ("kind",), [(kind, counts[1]) for kind, counts in sent],
        )
        yield self._by(
            Counter, "clients_cut_off", "Connections the worker closed or dropped, by reason.",
            ("reason",), sorted((str(reason), n) for reason, n in m.cut_off.items()),
        )
        yield self._one(
            Gauge, "client_queue_max_bytes", "Bytes waiting for the client furthest behind.",
            gauges["largest_queue"],
        )
        yield self._one(Counter, "node_triggers", "Node triggers started.", m.triggers)
        yield self._one(
            Counter, "node_trigger_errors", "Node triggers that raised.", m.trigger_errors
        )
        yield self._one(
            HistogramFamily, "node_trigger_duration_seconds",
            "Node trigger time (nodes funcnodes-core runs as fast are not timed).",
            m.trigger_seconds.exposed(),
        )
        yield self._one(Counter, "saves", "Saves of the worker state.", m.saves)
        yield self._one(
            Counter, "save_failures", "Saves that failed (the previous file stays).",
            m.save_failures,
        )
        yield self._one(
            HistogramFamily, "save_duration_seconds", "Time to write the worker state.",
            m.save_seconds.exposed(),
        )
        yield self._one(
            Gauge, "large_message_store_bytes", "Bytes of large messages parked for download.",
            gauges["parked_bytes"],
        )
        yield self._one(
            Gauge, "process_pool_busy", "Process-pool children running a call.", pool_busy()
        )
        yield self._one(
            Gauge, "cluster_tasks", "Calls sent to the Dask cluster and not back yet.",
            cluster_tasks(),
        )
        if m.watch is not None:
            yield self._one(
                Gauge, "reactor_lag_seconds", "How late the last probe ran.", m.watch.lag
            )
            yield self._one(
                Counter, "reactor_stalls",
                "Times the reactor stood still longer than the stall threshold.", m.watch.stalls,
            )

    def _one(self, kind, name, doc, value):
        return self._by(kind, name, doc, (), [((), value)])

    def _by(self, kind, name, doc, labels, items):
        """
        A metric family of C{kind}; C{items} are (label value(s), value)
        pairs, a histogram's value its C{(buckets, sum)}.
        """
        family = kind(PREFIX + name, doc, labels=[*self.labels, *labels])
        constant = list(self.labels.values())
        for key, value in items:
            key = [key] if isinstance(key, str) else list(key)
            family.add_metric(constant + key, *(value if isinstance(value, tuple) else (value,)))
        return family


class Exposition:
    """
    The registry L{Collector} is registered in, made at the first scrape
    unless a host application gave one (with C{prometheus_client}'s process
    metrics: RSS, CPU, open files).
    """

    def __init__(self, collector, registry=None):
        self.collector = collector
        self.registry = registry
        if registry is not None:
            registry.register(collector)

    def render(self):
        """
        The exposition text (bytes) and its content type.
        """
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            self.registry = CollectorRegistry()
            ProcessCollector(registry=self.registry)
            self.registry.register(self.collector)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
