"""
Workarounds for funcnodes-core bugs that a long-running worker meets.

Each is narrow, applied once by L{apply} when a worker service is created,
and documented in docs/deviations.md ("funcnodes-core workarounds") with the
upstream function it works around, so it can go when funcnodes-core is fixed.

Data paths (funcnodes-core 2.4, C{funcnodes_core/datapath.py},
C{DataPath.add_dst_path}): every value an output gets has a new C{DataPath}
whose sources are its node's inputs' current paths, and each source keeps it
in its C{dst_paths} list for good. An input whose value was set once (a
default) never gets a new path, so its list grows by one path per trigger of
its node and keeps every path ever derived from it alive: tens of MB per
minute on a busy graph, and slower triggers (the list is scanned with C{in}).
C{dst_paths} is only read by C{DataPath.done}, which asks whether anything
downstream is still running: here it holds its paths weakly, so a path stays
while a current input value derives from it (an input holds its path, a
path its sources) and goes with the last such value.
"""

import weakref

from funcnodes_core.datapath import DataPath


class WeakPaths(weakref.WeakSet):
    """
    C{DataPath.dst_paths} holding its paths weakly; C{append} is the one list
    method funcnodes-core calls on it (besides C{in} and iteration).
    """

    append = weakref.WeakSet.add


_core_init = DataPath.__init__


def _init(self, *args, **kwargs):
    _core_init(self, *args, **kwargs)
    self.dst_paths = WeakPaths()


def apply():
    """
    Install the workarounds; calling it again changes nothing.
    """
    DataPath.__init__ = _init
