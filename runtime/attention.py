"""``attention()``: the public entry. Validates its inputs, then dispatches.

    out = scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=segment_ids)

Shapes (BTNH, like ``jax.nn.dot_product_attention``):

    query  [B, T, N, H]      value/key [B, S, K, H], N % K == 0 (GQA/MQA)
    out    [B, T, N, H]      in query's dtype
    lse    f32[B, T, N]      with return_lse=True; -inf on rows with no allowed key

Everything a user can get wrong is checked here, on shapes and dtypes only, before
any implementation traces: a ``ScoreModShapeError`` for query/key/value/options, a
``ScoreModTensorError`` for tensor parameters, a ``ScoreModError`` for the rest.
"""

from __future__ import annotations


from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from scoremod.errors import ScoreModError, ScoreModShapeError, ScoreModTensorError
from scoremod.dsl.ast import Tensor, walk
from scoremod.compiler.tensors import check_tensors as check_read_shapes, read_tensors
from scoremod.compiler.mod import Mod, compile_mod
from scoremod.compiler.plan import check_positions, plan_is_static
from scoremod.runtime.attention_plan import AttentionPlan, PlanRecorder
from scoremod.runtime.sinks import add_sinks, check_sinks
from scoremod.runtime.context_parallel import (BALANCED_CHUNKS_PER_DEVICE, context_attention,
                                               local_axis_size, local_context_attention)
from scoremod.runtime._dispatch import (as_mod, as_tensor, check_float_arrays, check_head_groups, concrete,
                                        implementation_names, resolve_scale, run_first)
from scoremod.runtime._dispatch_order import ATTENTION_ELSEWHERE, ATTENTION_ON_GPU

__all__ = ["attention", "plan", "context_layout", "check_inputs", "check_tensors", "dispatch", "Dispatch", "IMPLEMENTATIONS"]


IMPLEMENTATIONS = ("reference", "xla", "pallas", "mosaic", "cudnn")


def attention(query, key, value, *, mod=None, scale=None, q_offset=0, kv_offset=0,
              implementation=None, return_lse=False, mesh=None, context_axis=None, context_layout=None,
              context_strategy=None, plan=None, sinks=None, **tensors):
    """Attention with the score modification ``mod``.

    Args:
      query: ``[B, T, N, H]`` bf16, f16 or f32.
      key, value: ``[B, S, K, H]``, the query's dtype; N must be a multiple of K
        (query head ``h`` reads kv head ``h // (N // K)``).
      mod: a source string (``"causal & window(1024)"``), a compiled ``scoremod.Mod``,
        or None (no mask). The logit of ``(b, h, q, kv)`` is
        ``where(M, T(score) + B, -inf)`` with ``score = scale * <q_vec, k_vec>``.
      scale: a Python number; default ``1 / sqrt(H)``.
      q_offset, kv_offset: int or int ``[B]``: the absolute position of row ``i`` is
        ``q_offset + i`` and of column ``j`` is ``kv_offset + j`` (docs/language.md §1 Meaning).
      implementation: None (best available), "reference", "xla", "pallas", "mosaic",
        "cudnn", or a sequence of these, tried in order (NotImplementedError falls through).
      return_lse: also return the log-sum-exp of the logits, f32 ``[B, T, N]``.
      mesh, context_axis: context parallelism (docs/context_parallel.md): the sequence
        is sharded over the devices of ``mesh``'s axis ``context_axis`` and each device
        runs ``implementation`` on the (q-chunk, kv-chunk) pairs the mask does not rule
        out. Same result as the single-device call. ``context_axis`` without ``mesh``:
        inside the user's own ``jax.shard_map`` over that axis, on local shards
        (``[B, T/P, N, H]``: this device's chunks in ``context_layout``'s order, contiguous
        by default; tensors global; offsets the global sequence's).
      context_layout: None (chosen from the mask), "contiguous", "zigzag", "balanced" or a
        ``scoremod.ContextLayout`` (``scoremod.context_layout``): which sequence chunks each
        device works on.
      context_strategy: None (chosen: docs/context_parallel.md), "ring" (K/V passed
        around, steps the mask rules out skipped) or "all_gather" (K/V gathered once).
      plan: an ``AttentionPlan`` from ``scoremod.plan`` (block plans built once for many
        calls, e.g. every layer of a step). The call then takes the mod, the offsets, the
        tensors and, unless given, the implementation from the plan; its shapes must be
        the plan's. Not with ``mesh``.
      sinks: None, or float ``[N]``: one learned logit per query head that joins every
        row's softmax denominator and carries no value (docs/attention.md, "Sinks");
        differentiable; the lse then includes it.
      **tensors: the tensor parameters the mod reads, by name (``ids=segment_ids``).

    Returns:
      ``out [B, T, N, H]`` in the query's dtype, or ``(out, lse)`` with return_lse.
      Rows with no allowed key give 0 (and lse -inf), never NaN, in gradients too.

    Example::

        >>> q = k = v = jnp.ones((2, 128, 4, 64), jnp.bfloat16)
        >>> ids = jnp.repeat(jnp.arange(4), 32)[None].repeat(2, 0)      # int32[2, 128]
        >>> scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=ids).shape
        (2, 128, 4, 64)
    """
    if sinks is not None:
        if getattr(query, "ndim", None) == 4:
            sinks = check_sinks(sinks, query.shape[2])
        out, lse = attention(query, key, value, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                             implementation=implementation, return_lse=True, mesh=mesh, context_axis=context_axis,
                             context_layout=context_layout, context_strategy=context_strategy, plan=plan,
                             **tensors)
        out, lse = add_sinks(out, lse, sinks)   # checked above: the call raised unless query is 4-D
        return (out, lse) if return_lse else out
    context = (mesh, context_axis, context_layout, context_strategy)
    if plan is not None:
        if any(x is not None for x in context):
            raise ScoreModError("plan= cannot be combined with context parallelism (mesh=, context_axis=)",
                                hint="drop plan=: the context-parallel path plans each device's chunk pairs itself")
        mod, q_offset, kv_offset, implementation, tensors = _from_plan(
            plan, query, key, mod=mod, q_offset=q_offset, kv_offset=kv_offset, implementation=implementation,
            tensors=tensors)
        return _attention(query, key, value, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                          implementation=implementation, return_lse=return_lse, tensors=tensors, plans=plan)
    if any(x is not None for x in context):
        return _context_attention(query, key, value, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                                  implementation=implementation, return_lse=return_lse, mesh=mesh,
                                  context_axis=context_axis, layout=context_layout, strategy=context_strategy,
                                  tensors=tensors)
    return _attention(query, key, value, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                      implementation=implementation, return_lse=return_lse, tensors=tensors)


def _context_attention(query, key, value, *, mod, scale, q_offset, kv_offset, implementation, return_lse, mesh,
                       context_axis, layout, strategy, tensors):
    """``attention`` with the sequence sharded over ``mesh``'s ``context_axis``, or on local
    shards inside a shard_map over ``context_axis`` (runtime/context_parallel.py); every
    argument checked here first (local shards against the global sequence's sizes)."""
    if context_axis is None:
        raise ScoreModShapeError("context parallelism needs context_axis= (and mesh= for global arrays)",
                                 hint="attention(..., mesh=jax.make_mesh((8,), ('sp',)), context_axis='sp')")
    if mesh is None:
        devices = local_axis_size(context_axis)
        check_inputs(query, key, value, scale=scale, return_lse=return_lse)
        (B, Tl, N, H), (Sl, K) = query.shape, key.shape[1:3]
        whole_q = jax.ShapeDtypeStruct((B, Tl * devices, N, H), query.dtype)
        whole_kv = jax.ShapeDtypeStruct((B, Sl * devices, K, H), key.dtype)
        mod, _, scale, q_offset, kv_offset, tensors = _checked_call(
            whole_q, whole_kv, whole_kv, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
            implementation=implementation, return_lse=return_lse, tensors=tensors)
        if Tl == 0 or Sl == 0:
            return _nothing_to_attend(query, return_lse)
        out, lse = local_context_attention(_pair_attention, query, key, value, mod=mod, context_axis=context_axis,
                                           layout=layout, strategy=strategy, scale=scale, q_offset=q_offset,
                                           kv_offset=kv_offset, implementation=implementation, tensors=tensors)
        return (out, lse) if return_lse else out
    mod, _, scale, q_offset, kv_offset, tensors = _checked_call(
        query, key, value, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
        implementation=implementation, return_lse=return_lse, tensors=tensors)
    if query.shape[1] == 0 or key.shape[1] == 0:
        return _nothing_to_attend(query, return_lse)
    out, lse = context_attention(_pair_attention, query, key, value, mod=mod, mesh=mesh, context_axis=context_axis,
                                 layout=layout, strategy=strategy, scale=scale, q_offset=q_offset,
                                 kv_offset=kv_offset, implementation=implementation, tensors=tensors)
    return (out, lse) if return_lse else out


def _pair_attention(q, k, v, *, mod, scale, q_offset, kv_offset, implementation, return_lse, **tensors):
    """What one device runs on one (q-chunk, kv-chunk) pair of a context-parallel call."""
    return _attention(q, k, v, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                      implementation=implementation, return_lse=return_lse, tensors=tensors)


def _checked_call(query, key, value, *, mod, scale, q_offset, kv_offset, implementation, return_lse, tensors):
    """Every argument of an ``attention`` call checked: (mod, implementation names, scale,
    q_offset, kv_offset, tensors)."""
    mod = as_mod(mod)
    names = implementation_names(implementation, known=IMPLEMENTATIONS, on_gpu=ATTENTION_ON_GPU,
                                 elsewhere=ATTENTION_ELSEWHERE, what="attention")
    scale = check_inputs(query, key, value, scale=scale, return_lse=return_lse)
    batch, q_len, heads, _ = query.shape
    kv_len = key.shape[1]
    q_offset, q_seen = _check_offset(q_offset, batch, "q_offset", q_len)
    kv_offset, kv_seen = _check_offset(kv_offset, batch, "kv_offset", kv_len)
    tensors = check_tensors(mod, tensors, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                            q_offset=q_seen, kv_offset=kv_seen)
    return mod, names, scale, q_offset, kv_offset, tensors


def _attention(query, key, value, *, mod, scale, q_offset, kv_offset, implementation, return_lse, tensors,
               record=None, plans=None):
    mod, names, scale, q_offset, kv_offset, tensors = _checked_call(
        query, key, value, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
        implementation=implementation, return_lse=return_lse, tensors=tensors)
    if query.shape[1] == 0 or key.shape[1] == 0:
        return _nothing_to_attend(query, return_lse)

    out, lse = run_first(names, _RUNNERS, what="attention", mod=mod, query=query, key=key, value=value,
                         scale=scale, q_offset=q_offset, kv_offset=kv_offset, return_lse=return_lse,
                         tensors=tensors, record=record, plans=plans)
    return (out, lse) if return_lse else out


def _nothing_to_attend(query, return_lse):
    """A call with no queries or no keys (T or S = 0): zeros and lse -inf, like a fully
    masked row; on one device and with context parallelism alike."""
    batch, q_len, heads, _ = query.shape
    out = jnp.zeros(query.shape, query.dtype)
    lse = jnp.full((batch, q_len, heads), -jnp.inf, jnp.float32)
    return (out, lse) if return_lse else out


@dataclass(frozen=True)
class Dispatch:
    """What ``attention()`` would do with a call (``dispatch``).

    implementation: the implementation that would run (None when every one declines);
    declined: ``(name, why)`` of each one tried before it, in order."""
    implementation: str | None
    declined: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lines = [f"runs: {self.implementation or 'nothing (every implementation declines)'}"]
        lines += [f"  {name} declines: {why}" for name, why in self.declined]
        return "\n".join(lines)


def dispatch(query, key, value, *, mod=None, scale=None, q_offset=0, kv_offset=0, implementation=None,
             **tensors) -> Dispatch:
    r"""Which implementation ``attention()`` would run for this call, and why each one tried
    before it declines, without running anything: the call is traced abstractly
    (``jax.eval_shape``), so query/key/value and tensors may be ``jax.ShapeDtypeStruct``\ s.

    Arguments as ``attention()``. Mistakes in the call raise as ``attention()`` would.

    Example::

        >>> q = jax.ShapeDtypeStruct((2, 4096, 16, 128), jnp.bfloat16)
        >>> print(scoremod.dispatch(q, q, q, mod="causal & window(1024)"))
        runs: xla                      # on a CPU; on an H100/H200: mosaic
    """
    record: list = []
    # Tensors given as ShapeDtypeStructs are traced like q, k, v; concrete ones stay
    # concrete, as attention() would see them (their values may decide the plan).
    abstract = {n: t for n, t in tensors.items() if isinstance(t, jax.ShapeDtypeStruct)}

    def call(q, k, v, traced):
        return _attention(q, k, v, mod=mod, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                          implementation=implementation, return_lse=False, tensors={**tensors, **traced},
                          record=record)
    try:
        jax.eval_shape(call, query, key, value, abstract)
    except NotImplementedError:
        pass   # every implementation declined: record holds why
    chosen = next((name for name, why in record if why is None), None)
    return Dispatch(chosen, tuple((name, why) for name, why in record if why is not None))


def plan(mod, q_len: int, kv_len: int | None = None, *, batch: int = 1, heads: int = 1, kv_heads: int | None = None,
         head_dim: int = 128, dtype="bfloat16", q_offset=0, kv_offset=0, implementation=None,
         **tensors) -> AttentionPlan:
    """Build the block plans of an attention call once, for many calls (every layer of a step).

    ``attention(q, k, v, plan=p)`` then runs without building them: for a mask that reads
    tensors (``doc(ids)``) that is work on the device saved in every call after the first.
    The plans are those of the implementation ``attention()`` would pick for query
    ``[batch, q_len, heads, head_dim]`` and key/value ``[batch, kv_len, kv_heads,
    head_dim]`` of ``dtype`` (or ``implementation``'s); calls must have those shapes.
    Works inside ``jit`` (the tensors may be traced); the result is a pytree.

    Args:
      mod: a source string or compiled ``Mod``.
      q_len, kv_len: T and S (kv_len defaults to q_len).
      batch, heads, kv_heads, head_dim, dtype: the calls' other sizes and dtype
        (kv_heads defaults to heads).
      q_offset, kv_offset, implementation, **tensors: as for ``attention()``; the plan
        keeps the offsets and the tensors, and calls with it take them from it.

    Returns:
      An ``AttentionPlan``. Raises what ``attention()`` raises for the same arguments.

    Example::

        >>> plan = scoremod.plan("causal & doc(ids)", 8192, batch=2, heads=16, ids=ids)
        >>> out = scoremod.attention(q, k, v, plan=plan)        # in every layer
    """
    kv_len = q_len if kv_len is None else kv_len
    kv_heads = heads if kv_heads is None else kv_heads
    sizes = dict(q_len=q_len, kv_len=kv_len, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    for name, value in sizes.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ScoreModShapeError(f"scoremod.plan: {name} must be a positive int; got {value!r}")
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ScoreModShapeError(f"scoremod.plan: dtype must be a float dtype; got {dtype!r}") from None
    query = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
    mod, _, _, q_offset, kv_offset, tensors = _checked_call(
        query, kv, kv, mod=mod, scale=None, q_offset=q_offset, kv_offset=kv_offset, implementation=implementation,
        return_lse=False, tensors=tensors)
    # Which implementation runs and which block sizes it asks for: one abstract trace.
    record: list = []
    recorder = PlanRecorder()

    def call(q, k, v):
        return _attention(q, k, v, mod=mod, scale=None, q_offset=q_offset, kv_offset=kv_offset,
                          implementation=implementation, return_lse=False, tensors=tensors, record=record,
                          plans=recorder)
    jax.eval_shape(call, query, kv, kv)
    chosen = next(name for name, why in record if why is None)
    built = AttentionPlan(mod, int(batch), int(q_len), int(kv_len), int(heads), int(kv_heads), int(head_dim),
                          dtype.name, chosen, q_offset, kv_offset, dict(tensors))
    if plan_is_static(mod, q_offset, kv_offset):
        return built
    from scoremod.compiler.plan import build_plan
    plans = {(bq, bkv): build_plan(mod, q_len=q_len, kv_len=kv_len, block_q=bq, block_kv=bkv, batch=batch,
                                   heads=heads, q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
             for bq, bkv in recorder.blocks}
    return AttentionPlan(**{**built.__dict__, "plans": plans})


def context_layout(mod, devices: int, q_len: int, kv_len: int | None = None, *,
                   chunks_per_device: int = BALANCED_CHUNKS_PER_DEVICE, batch: int = 1, heads: int = 1,
                   q_offset=0, kv_offset=0, **tensors):
    """A ``balanced`` context layout: ``devices x chunks_per_device`` sequence chunks dealt
    so that every device has about the same non-empty blocks of ``mod``, from the mask
    (and the tensors' values: ``doc(ids)``). Pass it to ``attention(..., mesh=,
    context_axis=, context_layout=layout)``, or permute the data once per step and keep it
    permuted: ``x[:, layout.order(T)]`` with ``context_layout=layout.with_inputs_permuted()``
    (docs/context_parallel.md).

    Works inside ``jit``: from traced tensors the layout holds a traced chunk table (new
    values never recompile); from a static mask it is known at trace time.

    Args:
      mod: a source string or compiled ``Mod``.
      devices: P, the size of the mesh axis.
      q_len, kv_len: T and S (kv_len defaults to q_len); multiples of P x chunks_per_device.
      chunks_per_device: chunks each device holds (more: finer balance, more pair calls
        per ring step, chunks_per_device ** 2 of them).
      batch, heads, q_offset, kv_offset, **tensors: as for ``attention()``.

    Returns:
      A ``scoremod.ContextLayout`` named "balanced".

    Example::

        >>> layout = scoremod.context_layout("causal & doc(ids)", 8, T, ids=ids)
        >>> out = scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=ids, mesh=mesh,
        ...                          context_axis="sp", context_layout=layout)
    """
    kv_len = q_len if kv_len is None else kv_len
    sizes = dict(devices=devices, q_len=q_len, kv_len=kv_len, batch=batch, heads=heads,
                 chunks_per_device=chunks_per_device)
    for name, value in sizes.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ScoreModShapeError(f"scoremod.context_layout: {name} must be a positive int; got {value!r}")
    query = jax.ShapeDtypeStruct((batch, q_len, heads, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, kv_len, heads, 8), jnp.float32)
    mod, _, _, q_offset, kv_offset, tensors = _checked_call(
        query, kv, kv, mod=mod, scale=None, q_offset=q_offset, kv_offset=kv_offset, implementation=None,
        return_lse=False, tensors=tensors)
    from scoremod.compiler.context_plan import balanced_layout
    layout, _ = balanced_layout(mod, int(devices), int(chunks_per_device), q_len=int(q_len), kv_len=int(kv_len),
                                batch=int(batch), heads=int(heads), q_offset=q_offset, kv_offset=kv_offset,
                                tensors=tensors)
    return layout


def _from_plan(plan, query, key, *, mod, q_offset, kv_offset, implementation, tensors):
    """(mod, q_offset, kv_offset, implementation, tensors) of a call with ``plan=``: the
    plan's, after checking that what the call gives agrees with it."""
    if not isinstance(plan, AttentionPlan):
        raise ScoreModError(f"plan must be a scoremod.plan(...) result; got {type(plan).__name__}")
    if tensors:
        raise ScoreModTensorError(f"the plan carries the tensors it was built from; do not pass "
                                  f"{', '.join(sorted(tensors))} with plan=",
                                  hint="build a new plan with scoremod.plan(...) when the tensors change")
    if mod is not None and as_mod(mod) != plan.mod:
        raise ScoreModError(f"mod {str(as_mod(mod))!r} is not the plan's mod {str(plan.mod)!r}",
                            hint="leave mod out: the call takes the plan's")
    for name, given, own in (("q_offset", q_offset, plan.q_offset), ("kv_offset", kv_offset, plan.kv_offset)):
        if isinstance(given, int) and not isinstance(given, bool) and given == 0:
            continue   # not given
        if not (isinstance(given, int) and isinstance(own, int) and given == own):
            raise ScoreModError(f"{name} is the plan's; give it to scoremod.plan, not to attention(plan=...)")
    for what, x in (("query", query), ("key", key)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            continue   # check_inputs says what is wrong
        B, L, heads, H = x.shape
        want = ((plan.batch, plan.q_len, plan.heads, plan.head_dim) if what == "query"
                else (plan.batch, plan.kv_len, plan.kv_heads, plan.head_dim))
        if (B, L, heads, H) != want:
            raise ScoreModShapeError(f"{what} has shape {tuple(x.shape)}; the plan was built for {list(want)}",
                                     hint="build the plan with this call's sizes")
    return plan.mod, plan.q_offset, plan.kv_offset, implementation or plan.implementation, dict(plan.tensors)


# ---- validation ------------------------------------------------------------------------------

def check_inputs(query, key, value, *, scale=None, return_lse=False) -> float:
    """Check query/key/value shapes and dtypes and the options; return the scale (a float).

    query ``[B, T, N, H]``, key and value ``[B, S, K, H]``, N a multiple of K, all three
    of one dtype among bf16, f16, f32. Raises ``ScoreModShapeError``.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ScoreModShapeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            layout = "[B, T, N, H]" if name == "query" else "[B, S, K, H]"
            raise ScoreModShapeError(f"{name} must have rank 4 ({layout}, like jax.nn.dot_product_attention); "
                                     f"got shape {tuple(x.shape)}",
                                     hint="add a batch axis with x[None] or a head axis with x[:, :, None]"
                                     if x.ndim == 3 else None)
    B, T, N, H = query.shape
    if key.shape != value.shape:
        raise ScoreModShapeError(f"key and value must have the same shape [B, S, K, H]; got key "
                                 f"{tuple(key.shape)} and value {tuple(value.shape)}")
    Bk, S, K, Hk = key.shape
    if Bk != B:
        raise ScoreModShapeError(f"batch sizes differ: query has B={B}, key/value have B={Bk}")
    if Hk != H:
        raise ScoreModShapeError(f"head dims differ: query has H={H}, key/value have H={Hk}")
    if B == 0 or N == 0 or H == 0:
        empty = "batch" if B == 0 else "heads" if N == 0 else "head dim"
        raise ScoreModShapeError(f"query {tuple(query.shape)} has an empty {empty}; B, N and H must be "
                                 "at least 1 (T and S may be 0)")
    check_head_groups(N, K)
    check_float_arrays({"query": query, "key": key, "value": value})
    if not isinstance(return_lse, (bool, np.bool_)):
        raise ScoreModShapeError(f"return_lse must be True or False; got {return_lse!r}")
    return resolve_scale(scale, H)


def _check_offset(offset, batch: int, name: str, length: int):
    """``(offset, seen)``: the offset the implementations take (a Python int stays an int,
    static; anything else becomes int32 ``[B]``) and the one the tensor checks see: the
    same int, the int32 ``[B]`` values whenever the offset is concrete (a NumPy array or a
    jax array closed over by ``jit`` too: the array the implementations take is then a
    tracer), else the traced array (the checks then use positions ``0 .. length - 1``).
    The positions ``offset .. offset + length - 1`` must fit in int32 (checked whenever
    the offset is concrete)."""
    if isinstance(offset, (bool, np.bool_)):
        raise ScoreModShapeError(f"{name} must be an int or an int array [B]; got {offset!r}")
    if isinstance(offset, (int, np.integer)):
        check_positions(name, [int(offset)], length)
        return int(offset), int(offset)
    dtype = getattr(offset, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ScoreModShapeError(f"{name} must be an int or an int array [B]; got "
                                 f"{getattr(offset, 'dtype', type(offset).__name__)}")
    if offset.ndim not in (0, 1) or (offset.ndim == 1 and offset.shape != (batch,)):
        raise ScoreModShapeError(f"{name} must be an int or an int array [B] with B={batch}; got shape "
                                 f"{tuple(offset.shape)}")
    values = concrete(offset)
    if values is not None:
        check_positions(name, [int(v) for v in values.reshape(-1)], length)
    array = jnp.broadcast_to(jnp.asarray(offset).astype(jnp.int32), (batch,))
    seen = array if values is None else np.broadcast_to(values.astype(np.int32), (batch,))
    return array, seen


def check_tensors(mod: Mod, tensors: dict, *, batch: int, heads: int, q_len: int, kv_len: int,
                  q_offset=0, kv_offset=0) -> dict:
    """Check the tensor parameters against how ``mod`` reads them; return them as jax arrays.

    * no tensor name collides with ``attention()``'s own keywords;
    * ``scoremod.compiler.tensors.check_tensors``: every tensor the mod reads is given
      and nothing else; a read with n indices has rank <= n (indices align right; a bare
      name is a scalar); an axis indexed by ``b``/``h`` has size B/N or 1; one indexed by
      ``q``/``kv`` covers the largest position read, offset included (or has size 1);
    * a tensor used inside an index is an integer (or bool) array.

    Python ints become int32, floats float32. Raises ``ScoreModTensorError``.
    """
    # A tensor named like one of attention()'s keywords cannot be written: the language
    # rejects it (dsl/definitions.py, RESERVED_TENSOR_NAMES).
    source = str(mod)
    try:
        check_read_shapes(mod, tensors, batch, heads, q_len, kv_len, q_offset=q_offset, kv_offset=kv_offset)
    except ScoreModTensorError as exc:
        raise ScoreModTensorError(exc.message, source=source, hint=exc.hint) from None
    arrays = {name: as_tensor(name, value, source) for name, value in read_tensors(mod, tensors).items()}
    for part in (mod.canonical.mask, mod.canonical.transform, mod.canonical.bias):
        for node in walk(part) if part is not None else ():
            if not isinstance(node, Tensor):
                continue
            for index in node.indices:
                for inner in walk(index):
                    if isinstance(inner, Tensor) and jnp.issubdtype(arrays[inner.name].dtype, jnp.floating):
                        raise ScoreModTensorError(
                            f"tensor '{inner.name}' is used in an index of {node} but has dtype "
                            f"{arrays[inner.name].dtype}; indices must be integers", source=source,
                            hint=f"pass {inner.name} as an int array")
    return arrays


# ---- implementations -------------------------------------------------------------------------
# Each runner takes validated inputs and returns (out, lse) (lse None unless return_lse),
# or raises NotImplementedError saying why it cannot run this call. Each imports its
# implementation when first tried (deferred: the kernels load Pallas and its GPU backends,
# which a call that runs xla or reference never needs).

def _run_reference(query, key, value, *, return_lse, plans, **call):
    from scoremod.runtime.reference import reference_attention
    del plans   # dense: no blocks to skip
    return reference_attention(query, key, value, **call)


def _run_xla(query, key, value, *, return_lse, **call):
    from scoremod.runtime.xla import xla_attention
    return xla_attention(query, key, value, **call)


def _run_pallas(query, key, value, *, return_lse, **call):
    from scoremod.runtime.pallas_attention import pallas_attention
    result = pallas_attention(query, key, value, return_lse=return_lse, **call)
    if not return_lse:
        return result, None
    out, lse = result
    return out, jnp.transpose(lse, (0, 2, 1))   # the kernel's lse is [B, N, T]; ours is [B, T, N]


def _run_mosaic(query, key, value, *, return_lse, **call):
    from scoremod.runtime.mosaic_attention import mosaic_attention
    out, lse = mosaic_attention(query, key, value, return_lse=True, **call)
    return out, (jnp.transpose(lse, (0, 2, 1)) if return_lse else None)


def _run_cudnn(query, key, value, *, mod, scale, q_offset, kv_offset, return_lse, tensors, plans):
    if return_lse:
        raise NotImplementedError("jax.nn.dot_product_attention does not return the log-sum-exp")
    if jax.default_backend() != "gpu":
        raise NotImplementedError(f"cuDNN needs a GPU; the default backend is {jax.default_backend()}")
    del plans   # cuDNN plans its own (dense or causal) blocks
    canonical = mod.canonical
    causal = canonical.mask == compile_mod("causal").canonical.mask
    if canonical.transform is not None or canonical.bias is not None or not (causal or not canonical.has_mask):
        raise NotImplementedError(f"cuDNN runs only dense or causal attention without bias; got {str(mod)!r}")
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0):
        raise NotImplementedError("cuDNN runs only q_offset = kv_offset = 0")
    if query.shape[1] != key.shape[1]:
        raise NotImplementedError(f"cuDNN path runs only T == S; got T={query.shape[1]}, S={key.shape[1]}")
    if jnp.dtype(query.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(f"cuDNN flash attention takes bf16/f16; got {query.dtype}")
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256:
        raise NotImplementedError(f"cuDNN needs a head dim that is a multiple of 8 and <= 256; got {head_dim}")
    out = jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=causal,
                                       implementation="cudnn")
    return out, None

_RUNNERS = {"reference": _run_reference, "xla": _run_xla, "pallas": _run_pallas,
            "mosaic": _run_mosaic, "cudnn": _run_cudnn}
