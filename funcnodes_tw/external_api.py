"""
What the author of an external worker subclasses: L{ExternalWorker}, its
pydantic L{ExternalWorkerConfig} and the L{rpc} mark. Importable as
C{funcnodes_tw.external} names too; the worker itself drives instances from
L{funcnodes_tw.external} and imports this module (and pydantic) only when a
package offers such a class.
"""

import asyncio
from pathlib import Path
from typing import ClassVar

from funcnodes_core import EventEmitterMixin, NodeClassMixin
from pydantic import BaseModel
from twisted.logger import Logger

from funcnodes_tw.external import _RPC_MARK, DEFAULT_INTERVAL

_log = Logger()


class ExternalWorkerConfig(BaseModel):
    """
    Base of an external worker's configuration.

    Fields declared with C{json_schema_extra={"export": False}}, or named in
    C{EXPORT_EXCLUDE_FIELDS}, stay out of exported worker states.
    """

    EXPORT_EXCLUDE_FIELDS: ClassVar[frozenset] = frozenset()


def export_excluded(config_cls):
    """
    The fields of a config class that exports leave out (either base class).
    """
    excluded = set(getattr(config_cls, "EXPORT_EXCLUDE_FIELDS", ()) or ())
    for name, field in config_cls.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("export") is False:
            excluded.add(name)
    return excluded


def rpc(function):
    """
    Mark a method of an L{ExternalWorker} as callable by clients through
    the C{call_external_worker} command.
    """
    setattr(function, _RPC_MARK, True)
    return function


class ExternalWorker(NodeClassMixin, EventEmitterMixin):
    """
    Base class of external workers run by funcnodes_tw.

        class Camera(ExternalWorker):
            worker_type = "camera"            # or NODECLASSID = "camera"
            config_cls = CameraConfig         # a pydantic ExternalWorkerConfig
            LOOP_INTERVAL = 0.5

            async def setup(self): ...        # once, when it starts
            async def loop(self): ...         # every LOOP_INTERVAL seconds
            async def close(self): ...        # once, when it stops

            @instance_nodefunction()
            def snapshot(self) -> bytes: ...  # node "camera.<uuid>.snapshot"

            @rpc
            async def focus(self, distance: float): ...

    Hooks may be plain or C{async}; an exception in C{loop()} is logged and
    the next run happens as usual. C{worker_type} and C{NODECLASSID} name
    the same thing, the id that class and its node ids carry; give either.
    The constructor has the reference base's signature, so instances can be
    made the same way for both kinds.
    """

    IS_ABSTRACT = True
    NODECLASSID = None
    worker_type = None
    NAME = None
    config_cls = ExternalWorkerConfig
    LOOP_INTERVAL = DEFAULT_INTERVAL

    def __init_subclass__(cls, **kwargs):
        own = cls.__dict__
        if own.get("NODECLASSID") is None and own.get("worker_type"):
            cls.NODECLASSID = own["worker_type"]
        elif own.get("NODECLASSID") and own.get("worker_type") is None:
            cls.worker_type = own["NODECLASSID"]
        super().__init_subclass__(**kwargs)

    def __init__(self, workerid, config=None, data_path=None, name=None):
        """
        An invalid C{config} raises C{pydantic.ValidationError}; unlike
        L{update_config}, C{post_config_update} is not called from here
        (a subclass's own C{__init__} has not run yet).
        """
        super().__init__()
        self.uuid = workerid
        if name:
            self.name = name
        self._data_path = Path(data_path) if data_path else None
        self._running = False
        self._remove = None
        self._nodeshelf = None
        self._config = self._merged(config)

    # region state

    @property
    def running(self):
        return self._running

    @property
    def config(self):
        return self._config

    @property
    def data_path(self):
        """
        This instance's own directory, created on first use.
        """
        if self._data_path is None:
            return None
        self._data_path.mkdir(parents=True, exist_ok=True)
        return self._data_path

    def _merged(self, config):
        values = self._config.model_dump() if hasattr(self, "_config") else {}
        if isinstance(config, BaseModel):
            config = config.model_dump()
        values.update(config or {})
        return self.config_cls(**values)

    def update_config(self, config):
        """
        Merge C{config} (a dict or a config model) into the current config.

        @raise pydantic.ValidationError: the result is not a valid config.
        """
        self._config = self._merged(config)
        try:
            self.post_config_update()
        except Exception:
            _log.failure("post_config_update of {name} failed", name=self.name)
        return self._config

    def serialize(self, export=False):
        """
        The instance as the protocol shows it (PROTOCOL.md section 13).
        """
        exclude = export_excluded(type(self._config)) if export else None
        return {
            "uuid": self.uuid,
            "nodeclassid": self.NODECLASSID,
            "running": self.running,
            "name": self.name,
            "config": self._config.model_dump(mode="json", exclude=exclude),
        }

    def get_nodeshelf(self):
        return self._nodeshelf

    def set_nodeshelf(self, shelf):
        """
        Publish a shelf of extra nodes beneath this instance's shelf.
        """
        self._nodeshelf = shelf
        self.emit("nodes_update")

    # endregion
    # region hooks

    def setup(self):
        """
        Called once when the instance starts, before the first C{loop()}.
        """

    def loop(self):
        """
        Called every C{LOOP_INTERVAL} seconds while the instance runs.
        """

    def close(self):
        """
        Called once when the instance stops (removed, or the worker stops);
        it has C{STOP_TIMEOUT} seconds.
        """

    def post_config_update(self):
        """
        Called after C{update_config}; the config is C{self.config}.
        """

    # endregion

    async def stop(self):
        """
        End this instance from inside: the worker removes it, its shelf and
        its nodes as C{remove_external_worker} does.
        """
        if self._remove is None:
            await _as_awaitable(self.close())
            self._running = False
            return
        await self._remove().asFuture(asyncio.get_running_loop())


async def _as_awaitable(result):
    if asyncio.iscoroutine(result):
        return await result
    return result
