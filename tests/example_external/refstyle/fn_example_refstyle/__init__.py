"""
A FuncNodes package whose external worker subclasses the reference worker's
base class, announced by the ``external_worker`` entry point (the reference
worker only honours FUNCNODES_WORKER_CLASSES of modules imported before its
package scan, so the entry point is what makes it work there). Both the
reference worker and funcnodes_tw run it.
"""

from funcnodes_core import instance_nodefunction
from funcnodes_worker import FuncNodesExternalWorker
from funcnodes_worker.external_worker import ExternalWorkerConfig


class CounterConfig(ExternalWorkerConfig):
    step: int = 1


class CounterWorker(FuncNodesExternalWorker):
    NODECLASSID = "fn_example.counter"
    config_cls = CounterConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count = 0

    async def loop(self):
        self.count += self.config.step

    @instance_nodefunction()
    def current(self) -> int:
        return self.count

    @instance_nodefunction()
    def scaled(self, factor: int = 2) -> int:
        return self.count * factor


FUNCNODES_WORKER_CLASSES = [CounterWorker]
