"""
A FuncNodes package without an ``external_worker`` entry point: its worker
classes are found through the FUNCNODES_WORKER_CLASSES module attribute. It
also publishes a shelf of its own nodes per instance (set_nodeshelf).
"""

import funcnodes_core as fn

from funcnodes_tw.external import ExternalWorker, instance_nodefunction


class Doubler(ExternalWorker):
    worker_type = "fn_example.doubler"  # no NODECLASSID: worker_type names it

    @instance_nodefunction()
    def double(self, x: int = 1) -> int:
        return 2 * x

    def post_config_update(self):
        pass

    def publish_extra(self):
        @fn.NodeDecorator(f"fn_example.doubler.{self.uuid}.extra", name="Extra")
        def extra() -> str:
            return "extra"

        self.set_nodeshelf(fn.Shelf(name="extras", nodes=[extra]))


FUNCNODES_WORKER_CLASSES = [Doubler]
