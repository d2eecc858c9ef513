"""
Private attributes of the libraries under the worker (Twisted, asyncio,
Autobahn), read where their public API costs a reactor turn or a parser
pass per frame.

A new release may rename what is private to it. Each place that reads such
attributes probes them once, at first use, through an L{Internals}; when
one is missing it takes the public path instead, slower but right, and the
worker says once what it is missing instead of failing on every frame.
"""

from twisted.logger import Logger

_log = Logger()


class Internals:
    """
    Private attributes of one kind of object, probed on the first one seen.
    """

    #: Every probe made, so that tests can take the attributes away.
    made = []

    def __init__(self, owner, names, fallback):
        """
        @param owner: what the attributes belong to, for the warning.
        @param names: the attribute names the fast path reads.
        @param fallback: what the worker does without them, for the warning.
        """
        self.owner = owner
        self.names = tuple(names)
        self.fallback = fallback
        self.present = None  # unknown until the first use
        self.made.append(self)

    def usable(self, obj):
        """
        Whether C{obj}'s kind has every attribute: decided on the first
        call, when a missing one is logged once.
        """
        if self.present is None:
            missing = self.missing(obj)
            self.present = not missing
            if missing:
                _log.warn(
                    "{owner} ({kind}) has no {missing}: {fallback}",
                    owner=self.owner,
                    kind=f"{type(obj).__module__}.{type(obj).__qualname__}",
                    missing=", ".join(missing),
                    fallback=self.fallback,
                )
        return self.present

    def missing(self, obj):
        return [name for name in self.names if not hasattr(obj, name)]
