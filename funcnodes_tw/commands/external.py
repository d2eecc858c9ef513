"""
Commands about external workers (PROTOCOL.md 5.6 and 13).

Only classes of packages added as dependencies can be started by clients;
the error messages are the reference's, word for word, as the UI shows them.
"""

from funcnodes_tw.commands import command
from funcnodes_tw.external import WorkerNotFound


def _instance(worker, worker_id, class_id, message):
    handle = worker.external.find(class_id, worker_id)
    if handle is None:
        raise WorkerNotFound(message)
    return handle


@command
def get_worker_dependencies(worker):
    return worker.external.dependencies()


@command(saves=True)
def add_external_worker(worker, module: str, cls_module: str, cls_name: str):
    cls = worker.external.offered_class(module, cls_module, cls_name)
    return worker.external.start(cls).serialize()


@command(saves=True)
def update_external_worker(worker, worker_id: str, class_id: str, name=None, config=None):
    """
    Rename an instance and/or merge C{config} into its config. Unlike the
    reference, the change is saved.
    """
    if config is not None and not isinstance(config, dict):
        raise ValueError("config must be an object")
    handle = _instance(worker, worker_id, class_id, f"Worker {worker_id} not found")
    worker.external.update(handle, name=name, config=config)


@command(saves=True)
def remove_external_worker(worker, worker_id: str, class_id: str):
    if class_id not in worker.external.instances:
        raise WorkerNotFound(f"No worker with id {class_id} and instance id {worker_id}")
    handle = _instance(worker, worker_id, class_id, f"No worker with instance id {worker_id}")
    return worker.external.remove(handle)


@command
def get_external_worker_config(worker, worker_id: str, class_id: str):
    handle = _instance(worker, worker_id, class_id, f"Worker {worker_id} ({class_id}) not found")
    config = handle.instance.config
    return {
        "jsonSchema": config.model_json_schema(),
        "uiSchema": None,
        "formData": config.model_dump(mode="json"),
    }


@command
def call_external_worker(worker, worker_id: str, class_id: str, method: str, kwargs=None):
    """
    Run a method an L{funcnodes_tw.external.ExternalWorker} marked with
    C{@rpc} (not in the reference protocol).
    """
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError("kwargs must be an object")
    handle = _instance(worker, worker_id, class_id, f"Worker {worker_id} ({class_id}) not found")
    return worker.external.call(handle, method, kwargs)
