"""Every private torch internal distclip reads, in one place, with one "unsupported version" message.

distclip is tested with torch 2.13 (see ``TESTED_TORCH``). The adapters never touch a private
attribute themselves: they call these functions, so a torch release that moves an internal fails
here, once, with :class:`UnsupportedVersionError` naming what is missing, instead of deep inside a
backward hook. (DeepSpeed's internals: :mod:`distclip.compat.deepspeed`.)
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from ..errors import UnsupportedVersionError

if TYPE_CHECKING:  # for the checker only: ``import distclip`` does not import torch.distributed.tensor
    from typing import TypeGuard  # Python 3.10+

    from torch.distributed.tensor import DTensor

TESTED_TORCH = "2.13"
TESTED_DEEPSPEED = "0.19.8"




def unsupported(what: str, err: BaseException | None = None, package: str = "torch",
                version: str | None = None) -> UnsupportedVersionError:
    """The one message for an internal that is not where distclip expects it.

    Install advice only where it helps: on the version distclip was checked on, the internal is
    missing for another reason (an object distclip does not know), which is a distclip bug to report.
    """
    version = version or torch.__version__
    detail = f" ({type(err).__name__}: {err})" if err is not None else ""
    tested = TESTED_TORCH if package == "torch" else TESTED_DEEPSPEED if package == "deepspeed" else None
    if tested is not None and version.startswith(tested):
        advice = (f"{package} {version} is the version distclip is tested with, so this object is one distclip "
                  "does not handle: please report it (with `python -m torch.utils.collect_env` and how the object was "
                  "built)")
    else:
        advice = (f"This distclip release is tested with torch {TESTED_TORCH} and DeepSpeed {TESTED_DEEPSPEED}; "
                  "install one of those versions, or upgrade distclip")
    return UnsupportedVersionError(f"distclip: {what} is not available in {package} {version}{detail}. {advice}.")


def internal_reader(what: str, errors: tuple[type[BaseException], ...], package: str = "torch",
                    version: Callable[[], str] = lambda: torch.__version__
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator for a function that reads ``package``'s internals: ``errors`` raised inside it (the internal
    moved or changed) become :class:`UnsupportedVersionError` naming ``what``, the installed version and advice."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except errors as err:
                raise unsupported(what, err, package, version()) from err

        return run

    return wrap


def _internal(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn AttributeError/ImportError/TypeError raised while reading a torch internal into UnsupportedVersionError."""
    return internal_reader(what, (AttributeError, ImportError, TypeError))


# ------------------------------------------------------------------ kernels
# The foreach kernels torch.optim itself uses (private names, stable in practice).
foreach_norm = torch._foreach_norm
foreach_mul = torch._foreach_mul
foreach_mul_ = torch._foreach_mul_
foreach_zero_ = torch._foreach_zero_
foreach_copy_ = torch._foreach_copy_


@_internal("torch.utils._foreach_utils._group_tensors_by_device_and_dtype")
def group_tensors_by_device_and_dtype(tensorlists: list[list[Any]], with_indices: bool = False) -> dict[Any, Any]:
    """torch's own grouping of tensor lists by (device, dtype), as its foreach optimizers call it."""
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    return _group_tensors_by_device_and_dtype(tensorlists, with_indices=with_indices)


def supports_amp_scaling(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` divides the gradients by its ``grad_scale`` itself (torch's fused optimizers)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def uncompiled(module: Any) -> Any:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds; any other object as it is."""
    return getattr(module, "_orig_mod", module) if type(module).__name__ == "OptimizedModule" else module


def flat_param_fqns(param: Any) -> list[str] | None:
    """An FSDP1 ``FlatParameter``'s original parameter names (``use_orig_params=False``); None for any other tensor."""
    fqns = getattr(param, "_fqns", None)
    return None if fqns is None else list(fqns)


@_internal("torch.utils._foreach_utils._group_tensors_by_device_and_dtype")
def group_by_device_and_dtype(
        tensors: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]]:
    """``{(device, dtype): (tensors, their indices in the input)}`` in first-seen order (torch's own grouping)."""
    if not tensors:
        return {}
    grouped = group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    return {key: (same_kind, indices) for key, ([same_kind], indices) in grouped.items()}


# ------------------------------------------------------------------ torch.compile
def outside_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` always runs eagerly, also when called inside a ``torch.compile``'d region (one graph break there).

    For distclip's per-step entry points (``clip``, ``measure``, the optimizer step hooks of
    ``attach``, the functional API). Traced by dynamo they are wrong or slow, not just unoptimised:
    checked on torch 2.13, a ``torch.compile``'d ``AdamW(fused=True).step`` with ``attach`` traced
    the pre-step hook and the fused kernel read no ``grad_scale`` (the folded coefficient was
    dropped: the parameters equalled an unclipped step's bitwise), and the clip's Python state
    (step counts, policy state) was guarded on, so each step recompiled. Run eagerly, the clip issues
    its one collective, the fold sets ``grad_scale`` on the real optimizer, and dynamo resumes tracing
    the user's code after it (``docs/guides/compile.md``).
    """
    return torch.compiler.disable(fn, recursive=True)


# ------------------------------------------------------------------ autograd
def backward_id() -> int:
    """Id of the running backward (a new one per ``backward()`` call), -1 outside any backward."""
    return torch._C._current_graph_task_id()


def queue_after_backward(callback: Callable[[], None]) -> bool:
    """Run ``callback`` at the end of the current backward (after the callbacks queued before it)."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(callback)
        return True
    except RuntimeError:  # not inside a backward
        return False


def version(tensor: torch.Tensor) -> int:
    """The tensor's version counter (bumped by every in-place write through it or a view of it)."""
    return tensor._version


# ------------------------------------------------------------------ amp
# ``torch._amp_foreach_non_finite_check_and_unscale_`` (what GradScaler and ShardedGradScaler
# call to unscale gradients in place) does not bump the gradients' version counters in torch
# 2.13, so a gradient unscaled after backward looks untouched. distclip wraps it once: after the
# original op, the versions are bumped (so a norm measured during backward is known to be stale)
# and each unscaled gradient is remembered with its new version (so a non-finite norm of these
# gradients is known to be a loss-scale overflow that GradScaler will skip).
# Keyed by id(tensor), not a WeakKeyDictionary: looking a live tensor up there compares it with
# itself through weakref equality, i.e. Tensor.__eq__ (elementwise), which raises for tensors of
# more than one element. The weak reference only tells a live tensor from a dead one's reused id.
#
# torch.compile: inside a user's compiled region both wrappers (this one and the collective one below) are
# transparent: dynamo traces only the original op (a c10d collective becomes a functional collective),
# so distclip adds no graph break there. The write is still seen: a compiled graph that writes into one
# of its inputs applies the write with ``copy_`` after the graph, which bumps the version counter
# (checked on torch 2.13), and a reduction hook's result is then discarded (exact post-backward path).
# What is lost there is only the memory of GradScaler's unscaling (a non-finite norm of gradients
# unscaled inside a compiled region is not classified as a loss-scale overflow). Traced, the wrappers'
# id()-keyed bookkeeping of graph intermediates made dynamo abandon the whole region (torch 2.13:
# "Reconstruction of FakeIdVariable", the function then ran eagerly).
_UNSCALED: dict[int, tuple["weakref.ref[torch.Tensor]", int]] = {}
_AMP_OP = "_amp_foreach_non_finite_check_and_unscale_"


def _remember_unscaled(t: torch.Tensor) -> None:
    key = id(t)

    def forget(ref: "weakref.ref[torch.Tensor]", key: int = key) -> None:
        entry = _UNSCALED.get(key)
        if entry is not None and entry[0] is ref:  # not a newer tensor that reuses the id
            del _UNSCALED[key]

    _UNSCALED[key] = (weakref.ref(t, forget), t._version)


def track_amp_unscaling() -> None:
    """Make GradScaler's in-place unscaling visible to version counters (idempotent, process-wide)."""
    original = getattr(torch, _AMP_OP, None)
    if original is None:
        raise unsupported(f"torch.{_AMP_OP} (GradScaler's unscale kernel)")
    if getattr(original, "_distclip_tracked", False):
        return

    @functools.wraps(original)
    def unscale_and_bump_versions(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
        original(grads, found_inf, inv_scale)
        if torch.compiler.is_compiling():  # traced in a user's compiled region (the torch.compile note above)
            return
        tensors = list(grads)
        locals_ = [t._local_tensor for t in tensors if _is_dtensor(t)]
        torch.autograd.graph.increment_version(tensors + locals_)
        for t in tensors + locals_:
            _remember_unscaled(t)

    unscale_and_bump_versions._distclip_tracked = True  # type: ignore[attr-defined]
    setattr(torch, _AMP_OP, unscale_and_bump_versions)


def unscaled_by_grad_scaler(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of these gradients was unscaled in place by a GradScaler and not written since."""
    for t in tensors:
        entry = _UNSCALED.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            return True
    return False


# ------------------------------------------------------------------ in-place collectives
# c10d's in-place collectives (``dist.all_reduce(p.grad)``, ``broadcast``, ...) write through the
# dispatcher without bumping version counters (torch 2.13), so a gradient synchronised by hand
# after backward (tied weights across pipeline stages, copies of hand-written tensor parallelism,
# expert gradients) looks untouched to a reduction hook. distclip wraps these functions once: a
# call whose output is a watched tensor (a gradient a hook measured) or shares its view base
# marks the watch as written. Nothing else changes (no version is bumped, the call is the original).
_INPLACE_COLLECTIVES = {  # function -> the argument it writes into
    "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "broadcast": "tensor", "reduce": "tensor",
    "recv": "tensor", "irecv": "tensor", "scatter": "tensor", "reduce_scatter_tensor": "output",
    "all_gather_into_tensor": "output_tensor", "all_to_all_single": "output",
}


class WriteWatch:
    """Whether an in-place collective wrote into any of some tensors since the watch was made.

    Tensors are known by identity: a write into one of them, or into a view of the same base (e.g.
    ``grad.to_local()``, a view of FSDP2's flat reduce output, or a gradient of a DDP bucket view)
    counts; conservative within one base, never wrong. The bases are looked up only when a view
    is written (a write of a fresh tensor, e.g. a loss for logging, costs one set lookup).
    """

    def __init__(self, ids: frozenset[int], tensors: Callable[[], Iterable[torch.Tensor | None]]):
        self.ids = ids
        self._tensors = tensors
        self._bases: frozenset[int] | None = None
        self.written = False

    def sees(self, t: Any) -> bool:
        if id(t) in self.ids:
            return True
        base = getattr(t, "_base", None)
        if base is None:
            return False
        if self._bases is None:
            self._bases = frozenset(id(w._base if w._base is not None else w) for w in self._tensors() if w is not None)
        return id(base) in self._bases


_WATCHES: "weakref.WeakSet[WriteWatch]" = weakref.WeakSet()


def watch_collective_writes(ids: Iterable[int], tensors: Callable[[], Iterable[torch.Tensor | None]]) -> WriteWatch:
    """A watch over the tensors with these ids; ``tensors()`` gives them (for their view bases) on demand.
    It lives as long as the caller keeps it."""
    track_collective_writes()
    watch = WriteWatch(frozenset(ids), tensors)
    _WATCHES.add(watch)
    return watch


def _written_by(name: str, signature: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    try:
        target = signature.bind_partial(*args, **kwargs).arguments.get(_INPLACE_COLLECTIVES[name])
    except TypeError:
        return []
    return list(target) if isinstance(target, (list, tuple)) else [target]


def _mark_written(tensors: list[Any]) -> None:
    for watch in list(_WATCHES):
        if any(watch.sees(t) for t in tensors):
            watch.written = True


def track_collective_writes() -> None:
    """Make in-place c10d collectives visible to write watches (idempotent, process-wide)."""
    import inspect

    from torch.distributed import distributed_c10d

    for name in _INPLACE_COLLECTIVES:
        original = getattr(distributed_c10d, name, None)
        if original is None or getattr(original, "_distclip_tracked", False):
            continue
        signature = inspect.signature(original)

        def tracked(*args: Any, _original: Any = original, _name: str = name, _signature: Any = signature,
                    **kwargs: Any) -> Any:
            out = _original(*args, **kwargs)
            if _WATCHES and not torch.compiler.is_compiling():  # the torch.compile note at _UNSCALED
                _mark_written(_written_by(_name, _signature, args, kwargs))
            return out

        functools.update_wrapper(tracked, original)
        tracked._distclip_tracked = True  # type: ignore[attr-defined]
        setattr(distributed_c10d, name, tracked)
        if getattr(dist, name, None) is original:
            setattr(dist, name, tracked)


# ------------------------------------------------------------------ DTensor / DeviceMesh
_DTENSOR: list[type] = []


def _dtensor_class() -> type:
    # imported lazily (``import distclip`` needs no torch.distributed.tensor), kept in a list rather than
    # behind functools.cache: dynamo warns about traced lru_cache wrappers, and a user's compiled region that
    # runs GradScaler's unscale kernel traces this (through track_amp_unscaling's wrapper)
    if not _DTENSOR:
        from torch.distributed.tensor import DTensor

        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def _is_dtensor(t: Any) -> TypeGuard[DTensor]:
    return isinstance(t, _dtensor_class())


is_dtensor = _is_dtensor  # public name for the layers above


def module_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The tensors of ``module.parameters()`` (each once), from the modules' own dictionaries: a fraction of
    the generator's cost, which builds every name (``Module._modules`` / ``_parameters``, torch 2.13)."""
    modules, seen = [module], {id(module)}
    for m in modules:  # breadth first; the list grows as it is read
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                modules.append(child)
    return list(dict.fromkeys(p for m in modules for p in m._parameters.values() if p is not None))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (no autograd, no communication); a plain tensor as it is."""
    return t._local_tensor if _is_dtensor(t) else t


def dtensor_spec(t: torch.Tensor) -> Any:
    """A DTensor's spec object (FSDP2 gives a gradient the very spec object of its parameter)."""
    return getattr(t, "_spec", None)


@_internal("torch.distributed.tensor._utils.compute_local_shape_and_global_offset")
def dtensor_flat_offset(t: Any) -> int | None:
    """Where this rank's local tensor of DTensor ``t`` starts in the global tensor's flat (row-major) order, when
    it is one run of whole rows (every placement ``Replicate`` or ``Shard(0)``); None otherwise (a shard along a
    dimension >= 1, a strided shard as FSDP2 over tensor parallelism makes)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(p.is_replicate() or (type(p) is Shard and p.dim == 0) for p in t.placements):
        return None
    shape = tuple(t.shape)
    if len(shape) == 0:
        return 0
    local_shape, offset = compute_local_shape_and_global_offset(shape, t.device_mesh, t.placements)
    if tuple(local_shape[1:]) != shape[1:]:
        return None
    return int(offset[0]) * math.prod(shape[1:])


@_internal("DeviceMesh._get_root_mesh (the mesh a sub-mesh was sliced from)")
def root_mesh(mesh: Any) -> Any:
    """The mesh ``mesh`` was sliced or flattened from (itself when it is a root)."""
    root = mesh._get_root_mesh()
    return mesh if root is None else root


@_internal("DeviceMesh._layout / _rank_map (the mesh's CuTe layout over its root's ranks, torch >= 2.9)")
def mesh_instances(mesh: Any) -> torch.Tensor:
    """Every instance of ``mesh``'s layout over its root's ranks: an int tensor ``[K, *mesh.shape]``.

    A sliced, flattened or unflattened mesh is one instance of a layout over the root's rank map
    (``mesh["dp"]`` of ``(dp, tp)`` is one of ``tp`` instances, each over other ranks); the
    instances together hold every rank of the root exactly once. A root mesh is its only instance.
    """
    full = mesh._layout.remap_to_tensor(mesh._rank_map)
    return full.reshape(-1, *tuple(mesh.mesh.shape))


@_internal("DeviceMesh._layout / _rank_map (the mesh's CuTe layout over its root's ranks, torch >= 2.9)")
def mesh_identity(mesh: Any) -> tuple[Any, ...]:
    """A small key, equal for mesh objects that are the same layout over the same root (``mesh["tp"]`` sliced
    twice gives two objects): O(dimensions) to compute and hash, where ``DeviceMesh.__eq__`` compares every rank.

    Valid while ``mesh`` lives (it names the root's rank map by identity): hold the mesh with the key.
    """
    return id(mesh._rank_map), mesh._layout, mesh.device_type


# ------------------------------------------------------------------ simulation (the scale bench)
@_internal("torch.testing._internal.distributed.fake_pg (the 'fake' process-group backend)")
def init_fake_process_group(rank: int, world_size: int) -> None:
    """Join a simulated job of ``world_size`` ranks as ``rank``, in this one process (no other process exists).

    torch's fake backend answers every collective at once without moving data (outputs keep what they
    held); ``distclip.bench.scale`` uses it to run distclip's set-up as one rank of thousands.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


@_internal("DeviceMesh._unflatten (torchtitan's ParallelDims builds its meshes with it)")
def unflatten_mesh(mesh: Any, sizes: Sequence[int], names: Sequence[str]) -> Any:
    """A 1-D mesh split into named dimensions, as torchtitan 0.3's ``ParallelDims`` builds its world mesh."""
    return mesh._unflatten(0, tuple(sizes), tuple(names))


@_internal("DeviceMesh._flatten (torchtitan's dp_shard_cp, Accelerate's dp_cp)")
def flatten_mesh(mesh: Any, name: str) -> Any:
    """Dimensions of a mesh merged into one named dimension (torchtitan's FSDP mesh ``dp_shard_cp``)."""
    return mesh._flatten(name)


# ------------------------------------------------------------------ optimizers
def runs_step_hooks(optimizer: Any) -> bool:
    """Whether ``optimizer`` ran ``Optimizer.__init__`` (which sets up its step hooks); a wrapper that skipped
    it (torchft's ``OptimizerWrapper``) has no hook registry, and its ``step()`` calls none."""
    return hasattr(optimizer, "_optimizer_step_pre_hooks") and hasattr(optimizer, "_optimizer_step_post_hooks")


# ------------------------------------------------------------------ DDP
def ddp_has_comm_hook(ddp: Any) -> bool:
    return bool(getattr(ddp, "_comm_hooks", None))


# ------------------------------------------------------------------ FSDP1
class FSDP1Unit:
    """Read-only view of what distclip needs from one FSDP1 unit (``FullyShardedDataParallel``)."""

    @_internal("FSDP1 handle metadata (_handle, flat_param, _fqns, _shard_param_infos)")
    def __init__(self, fsdp: Any):
        handle = fsdp._handle
        self.fsdp = fsdp
        self.has_params = handle is not None
        if handle is None:
            return
        self.flat_param = handle.flat_param
        self.strategy: str = handle._sharding_strategy.name
        self.use_orig_params: bool = handle._use_orig_params
        self.fqns: list[str] = list(self.flat_param._fqns)
        # in_shard, offset_in_shard, numel_in_shard
        self.shard_infos: list[Any] = list(self.flat_param._shard_param_infos)
        # where each original parameter's piece of this rank's shard starts in the parameter's flat order
        self.intra_starts: list[int | None] = [info.intra_param_start_idx for info in self.shard_infos]
        self.shapes: list[tuple[int, ...]] = [tuple(s) for s in self.flat_param._shapes]  # original (global) shapes
        self.strides: list[tuple[int, ...]] = [tuple(s) for s in self.flat_param._strides]  # their strides (flat order)
        self.orig_params: list[Any] = list(self.flat_param._params or []) if self.use_orig_params else []
        self.shared_params: list[Any] = list(self.flat_param._shared_params or []) if self.use_orig_params else []
        self.process_group = fsdp.process_group
        self.device_mesh = getattr(fsdp, "_device_mesh", None)
        self.inter_node_group = getattr(fsdp, "_inter_node_pg", None)
        self.predivide: float = fsdp._gradient_predivide_factor
        self.postdivide: float = fsdp._gradient_postdivide_factor
        self.fake_reduce: bool = bool(getattr(handle, "_use_fake_reduce", False))

    @property
    def comm_hook(self) -> Any:
        return getattr(self.fsdp, "_comm_hook", None)

    @property
    @_internal("FSDP1 FlatParameter._local_shard (this rank's sharded parameter values)")
    def local_shard(self) -> torch.Tensor:
        """This rank's shard of the flat parameter (full precision, padding included), outside forward/backward too."""
        return self.flat_param._local_shard

    def set_comm_hook_state(self, state: Any) -> None:
        self.fsdp._comm_hook_state = state

    def accumulating(self) -> bool:
        """A sharded gradient from an earlier backward is kept and will be added to this one."""
        return hasattr(self.flat_param, "_saved_grad_shard")


def is_fsdp1_flattened(param: Any) -> bool:
    return bool(getattr(param, "_fsdp_flattened", False))


# ------------------------------------------------------------------ FSDP2
@_internal("FSDP2 internals (FSDPModule._get_fsdp_state()._fsdp_param_groups)")
def fsdp2_param_groups(module: torch.nn.Module) -> list[tuple[Any, Any]]:
    """(fully_shard module, its parameter group) for every module with exactly one group.

    ``set_all_reduce_hook`` is refused for modules with several groups (per-parameter meshes);
    their gradients are then measured after backward.
    """
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            groups = m._get_fsdp_state()._fsdp_param_groups
            if len(groups) == 1:
                out.append((m, groups[0]))
    return out


def fsdp2_has_all_reduce_hook(group: Any) -> bool:
    return getattr(group, "_all_reduce_hook", None) is not None


@_internal("FSDP2 parameter metadata (FSDPParam.sharded_param, sharded_size, padded_sharded_param_size)")
def fsdp2_params(group: Any) -> list[tuple[Any, int, int]]:
    """(sharded parameter, its local shard numel, its padded numel in the flat reduce output) in order."""
    return [(fp.sharded_param, fp.sharded_size.numel(), fp.padded_sharded_param_size.numel())
            for fp in group.fsdp_params]


@_internal("FSDP2 gradient division factors (_fsdp_collectives._get_gradient_divide_factors)")
def fsdp2_post_divides(group: Any, reduce_dtype: torch.dtype) -> bool:
    """Whether FSDP2 divides the reduce output after the all-reduce hook (it then is not the final gradient)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, FSDPMeshInfo

    info = group.mesh_info
    rs_group = group._reduce_scatter_process_group if isinstance(info, FSDPMeshInfo) else None
    ar_group = group._all_reduce_process_group if isinstance(info, DDPMeshInfo) else None
    _, post, _, _ = _get_gradient_divide_factors(
        rs_group, ar_group, reduce_dtype, group.device.type, group.gradient_divide_factor,
        group.force_sum_reduction_for_comms)
    return post is not None and post != 1
