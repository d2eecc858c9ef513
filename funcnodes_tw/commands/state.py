"""
Commands about the worker itself: identity, configuration, saved state.
"""

from funcnodes_tw.commands import command, library

AUTOSTART = ("never", "always", "unless-stopped")


@command
def uuid(worker):
    return worker.uuid


@command
def name(worker):
    return worker.display_name()


@command
def get_meta(worker):
    return worker.meta()


@command
def get_runstate(worker):
    return worker.runstate


@command
def heartbeat(worker):
    worker.last_heartbeat = worker.clock.seconds()


@command
def get_config(worker):
    config = worker.worker_json()
    config["data_path"] = str(worker.files.data)
    return config


def _autostart(value):
    if value is True:
        return "unless-stopped"
    if value is False:
        return "never"
    if value not in AUTOSTART:
        raise ValueError(f"Invalid autostart policy {value!r}. Expected one of {', '.join(AUTOSTART)}.")
    return value


@command
def update_worker_config(worker, name=None, autostart=None, update_on_startup=None):
    if name is not None:
        worker.name = str(name).strip() or None
    if autostart is not None:
        worker.config["autostart"] = _autostart(autostart)
    if update_on_startup is not None:
        if not isinstance(update_on_startup, dict):
            raise ValueError("update_on_startup must be an object")
        merged = dict(worker.config.get("update_on_startup", {}))
        merged.update({str(k): bool(v) for k, v in update_on_startup.items()})
        worker.config["update_on_startup"] = merged
    return worker.write_config()


@command
def view_state(worker):
    return worker.view_state()


@command
def full_state(worker):
    return {
        "backend": worker.backend_state(),
        "view": worker.view_state(),
        "worker": worker.external.running_ids(),
        "worker_dependencies": worker.external.dependencies(),
        "progress_state": worker.progress_state,
        "meta": worker.meta(),
    }


@command
def get_save_state(worker, export=False):
    return worker.save_state(export=bool(export))


@command
def save(worker):
    """
    Write now; the result is the state that reached the disk.
    """
    state = worker.save_state()
    return worker.save(state).addCallback(lambda _: state)


@command(saves=True)
def load_data(worker, data):
    if not isinstance(data, dict):
        raise ValueError("data must be a worker state object")
    # As at startup: nodes whose package is missing keep their IO ids and edges.
    worker.load(library.keep_io_ids(data))
    worker.worker_event("fullsync")


@command(saves=True)
def clear(worker):
    worker.clear()


@command
def stop_worker(worker):
    """
    Stop after the reply. Unlike the reference the client gets C{true}, and
    gets it first: the FuncNodes manager reads exactly one frame after asking.
    """
    worker.send_later(_shutdown, worker)
    return True


def _shutdown(worker):
    worker.set_progress("Stopping worker", "info", 0.0, False)
    worker.stop()
