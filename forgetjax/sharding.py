"""One device mesh with named axes (data, fsdp, tensor) and the single table mapping logical axes to mesh axes.

Every parameter carries `logical_axes` metadata (e.g. ("layers", "embed", "mlp")); activations are constrained
with the same vocabulary. `LOGICAL_RULES` is the only place that decides how those names land on the mesh, so a
new parallelism layout is a change to this table, not to the model.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("head_dim", None),
    ("lora_rank", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
)


def mesh_shape(data: int, fsdp: int, tensor: int, devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes on `devices` devices; one axis may be -1 to take the remaining devices."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if devices % known:
            raise ValueError(f"{devices} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} "
                         f"devices, {devices} available")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(data, fsdp, tensor, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _rule_table(rules) -> dict[str, tuple[str, ...]]:
    table = {}
    for logical, mesh_axes in rules:
        if mesh_axes is None:
            table[logical] = ()
        else:
            table[logical] = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return table


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None,
                    rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for logical axes on a Mesh or AbstractMesh; a dim that the mesh axes do not divide evenly
    stays replicated, size-1 mesh axes are dropped, and a mesh axis is used at most once per array."""
    table = _rule_table(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in forgetjax.sharding.LOGICAL_RULES")
        axes = tuple(a for a in table[name] if a not in used and (mesh is None or mesh.shape[a] > 1))
        if mesh is not None and shape is not None and axes:
            if shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def _variable_spec(var: nnx.Variable, mesh: Mesh) -> PartitionSpec:
    axes = var.get_metadata().get("logical_axes")
    shape = var.shape
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"logical_axes {axes} do not match shape {shape}")
    return logical_to_spec(axes, shape, mesh)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every variable of an (abstract or concrete) NNX state, from its logical_axes metadata."""
    return jax.tree.map(lambda v: NamedSharding(mesh, _variable_spec(v, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Build a module directly in its sharded layout: initialisation runs under jit with sharded outputs, so no
    replicated full copy ever exists on one device."""
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    @jax.jit
    def init():
        return nnx.split(factory())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move an existing model onto the mesh according to its logical axes."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh))
    return nnx.merge(graphdef, state)


def batch_spec(ndim: int) -> PartitionSpec:
    """Leading axis over (data, fsdp); the rest replicated."""
    return PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """Place a pytree of host arrays with the batch axis split over (data, fsdp).

    By default the arrays are the global batch, the same on every process, and each device takes its rows. With
    `process_local` (multi-process runs that load data per process) each process passes only the rows
    `forgetjax.distributed.process_rows` names, and the global batch is their concatenation."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    multi = jax.process_count() > 1

    def place(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if multi and process_local:
            return jax.make_array_from_process_local_data(sharding, x)
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by data x fsdp = {n}")
        if multi:
            return jax.make_array_from_process_local_data(sharding, x, x.shape)
        return jax.device_put(x, sharding)

    return jax.tree.map(place, batch)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation when a mesh is active (`jax.set_mesh`), a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))
