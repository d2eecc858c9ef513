"""
Commands on the graph: nodes, their inputs and outputs, edges and groups.

Unlike the reference, every command that changes what is saved asks for a
save (C{clear}, groups and value options included).
"""

from funcnodes_core import JSONEncoder

from funcnodes_tw import wire
from funcnodes_tw.commands import command
from funcnodes_tw.worker import DEFAULT_POS, DEFAULT_SIZE, set_node_view


def _node(worker, nid):
    return worker.nodespace.get_node_by_id(nid)


def _preview(value):
    return JSONEncoder.apply_custom_encoding(value, preview=True)


# region nodes


@command(saves=True)
def add_node(worker, id: str, **kwargs):
    return worker.nodespace.add_node_by_id(id, **kwargs)


@command(saves=True)
def remove_node(worker, id: str):
    return worker.nodespace.remove_node_by_id(id)


@command
def get_node(worker, id: str):
    return _node(worker, id)


@command
def get_node_state(worker, nid: str):
    return _node(worker, nid)._repr_json_()


@command
def get_node_status(worker, nid: str):
    return _node(worker, nid).status()


@command
def get_nodes(worker, with_frontend=False):
    nodes = [wire.describe_node(node) for node in worker.nodespace.nodes]
    for node in nodes:
        props = node.get("properties", {})
        node["frontend"] = (
            {
                "pos": props.get("frontend:pos", DEFAULT_POS),
                "size": props.get("frontend:size", DEFAULT_SIZE),
            }
            if with_frontend
            else None
        )
    return nodes


@command
def trigger_node(worker, nid: str):
    _node(worker, nid).request_trigger()
    return True


@command
def request_trigger(worker, nid: str):
    _node(worker, nid).request_trigger()
    return True


@command(saves=True)
def update_node(worker, nid: str, data: dict):
    node = _node(worker, nid)
    applied = {}
    for key, value in (data.get("properties") or {}).items():
        node.set_property(key, value)
    if "name" in data:
        node.name = data["name"]
        applied["name"] = node.name
    if "description" in data:
        node.description = str(data["description"])
        applied["description"] = node.description
    if "reset_inputs_on_trigger" in data:
        node.reset_inputs_on_trigger = data["reset_inputs_on_trigger"]
        applied["reset_inputs_on_trigger"] = node.reset_inputs_on_trigger
    return applied


@command(saves=True)
def update_node_view(worker, nid: str, data: dict):
    set_node_view(_node(worker, nid), data)


# endregion
# region inputs and outputs


@command
def set_io_value(worker, nid: str, ioid: str, value, set_default=False):
    io = _node(worker, nid).get_input(ioid)
    if set_default:
        io.set_default(value)
        worker.request_save()
    io.set_value(value)
    return io.value


@command(saves=True)
def set_default_value(worker, nid: str, ioid: str, value):
    _node(worker, nid).get_input(ioid).set_default(value)
    return True


@command
def get_io_value(worker, nid: str, ioid: str):
    return _preview(_node(worker, nid).get_input_or_output(ioid).value)


@command
def get_ios_values(worker, nid: str):
    node = _node(worker, nid)
    values = {ioid: _preview(io.value) for ioid, io in node.inputs.items()}
    values.update({ioid: _preview(io.value) for ioid, io in node.outputs.items()})
    return values


@command
def get_io_full_value(worker, nid: str, ioid: str):
    return wire.byte_encode(_node(worker, nid).get_input_or_output(ioid).value, preview=False)


@command(saves=True)
def update_io_options(worker, nid: str, ioid: str, name=None, hidden=None):
    io = _node(worker, nid).get_input_or_output(ioid)
    if name is not None:
        io.name = name or io.uuid
    if hidden is not None:
        io.hidden = bool(hidden) and not io.connections
    return io


@command(saves=True)
def update_io_value_options(worker, nid: str, ioid: str, options: dict):
    io = _node(worker, nid).get_input_or_output(ioid)
    io.update_value_options(**options)
    return io


# endregion
# region edges


def _ios(worker, src_nid, src_ioid, trg_nid, trg_ioid):
    return (
        _node(worker, src_nid).get_input_or_output(src_ioid),
        _node(worker, trg_nid).get_input_or_output(trg_ioid),
    )


@command(saves=True)
def add_edge(worker, src_nid: str, src_ioid: str, trg_nid: str, trg_ioid: str, replace=False):
    source, target = _ios(worker, src_nid, src_ioid, trg_nid, trg_ioid)
    return source.connect(target, replace=replace)


@command(saves=True)
def remove_edge(worker, src_nid: str, src_ioid: str, trg_nid: str, trg_ioid: str):
    source, target = _ios(worker, src_nid, src_ioid, trg_nid, trg_ioid)
    source.disconnect(target)
    return True


@command
def get_edges(worker):
    return worker.nodespace.serialize_edges()


# endregion
# region groups


@command(saves=True)
def group_nodes(worker, node_ids: list[str], group_ids: list[str]):
    worker.nodespace.groups.group_together(node_ids, group_ids)
    return worker.nodespace.groups.get_all_groups()


@command
def get_groups(worker):
    return worker.nodespace.groups.serialize()


@command(saves=True)
def update_group(worker, gid: str, data: dict):
    group = worker.nodespace.groups.get_group(gid)
    if not group:
        raise ValueError(f"Group with id {gid} not found")
    applied = {}
    if "position" in data:
        x, y = data["position"]
        group["position"] = [float(x), float(y)]
        applied["position"] = group["position"]
    return applied


@command(saves=True)
def remove_group(worker, gid: str):
    worker.nodespace.groups.remove_group(gid)
    return True


# endregion
