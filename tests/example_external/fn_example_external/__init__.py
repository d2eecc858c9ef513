"""
A tiny FuncNodes package with an external worker, installed by the tests.

ExampleWorker is built on funcnodes_tw.ExternalWorker and announced through
the ``external_worker`` entry point. It leaves traces in its data dir, so a
test can see from outside (another process) that it set up, loops and closed.
The sibling packages in refstyle/ and attrstyle/ cover the reference base
class and the FUNCNODES_WORKER_CLASSES attribute (see README.md).
"""

from pydantic import Field

from funcnodes_tw.external import ExternalWorker, ExternalWorkerConfig, instance_nodefunction, rpc


class ExampleConfig(ExternalWorkerConfig):
    greeting: str = "Hello"
    token: str = Field(default="secret", json_schema_extra={"export": False})


class ExampleWorker(ExternalWorker):
    """Greets, and counts its loop runs."""

    NODECLASSID = "fn_example.greeter"
    NAME = "Example greeter"
    config_cls = ExampleConfig
    LOOP_INTERVAL = 0.1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticks = 0
        self.setup_done = False
        self.closed = False

    async def setup(self):
        (self.data_path / "setup").write_text(self.uuid)
        self.setup_done = True

    async def loop(self):
        self.ticks += 1
        (self.data_path / "ticks").write_text(str(self.ticks))

    async def close(self):
        self.closed = True
        (self.data_path / "closed").write_text(str(self.ticks))

    @instance_nodefunction()
    def greet(self, who: str = "World") -> str:
        return f"{self.config.greeting}, {who}!"

    @rpc
    def ticks_so_far(self):
        return {"ticks": self.ticks}
