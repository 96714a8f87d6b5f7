"""Context parallelism, the runtime's half: one attention over a sequence sharded across
the devices of a mesh axis (docs/context_parallel.md).

    out = scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=ids,
                             mesh=mesh, context_axis="sp")

The sequence is cut by a ``ContextLayout`` (``compiler/context_plan.py``); device d holds
its chunks of q, k and v. A ring of ``P`` steps runs inside ``jax.shard_map``: at shift s
device d works on the kv shard of device ``(d - s) % P``, which arrives by one
``lax.ppermute`` straight from its home (not passed along a chain, so a step that no
device needs is neither computed nor sent: a window needs only the shifts that reach
its neighbours). Each (q-chunk, kv-chunk) pair runs the ordinary single-device
``attention`` with the chunks' absolute offsets, or nothing when the pair plan says it
is empty, and the partial results merge by their log-sum-exp. ``jax.grad`` flows through
all of it (the transpose of each ppermute sends dK/dV home).

Tensors the mod reads are indexed by absolute position, so every device gets them whole
(replicated); a ``[B, N, T, S]`` table is therefore held by every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from scoremod.errors import ScoreModShapeError
from scoremod.compiler.context_plan import (ContextLayout, PairPlan, RingSchedule, balanced_layout, device_work,
                                            layout_named, pair_plan, ring_schedule, shifts_needed)

__all__ = ["context_attention", "choose_layout", "merge_partials"]


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partial attentions over disjoint key sets: f32 ``out [B, T, N, H]`` and
    ``lse [B, T, N]`` each; rows empty in both stay 0 / -inf, with finite gradients."""
    m = jnp.maximum(lse_a, lse_b)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    wa, wb = jnp.exp(lse_a - m_safe), jnp.exp(lse_b - m_safe)
    total = wa + wb
    some = total > 0
    total_safe = jnp.where(some, total, 1.0)
    out = (out_a * (wa / total_safe)[..., None] + out_b * (wb / total_safe)[..., None])
    lse = jnp.where(some, m_safe + jnp.log(total_safe), -jnp.inf)
    return out, lse


def _check_mesh(mesh, context_axis):
    if not isinstance(mesh, Mesh):
        raise ScoreModShapeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}",
                                 hint="jax.make_mesh((8,), ('sp',))")
    if context_axis not in mesh.axis_names:
        raise ScoreModShapeError(f"context_axis={context_axis!r} is not an axis of the mesh "
                                 f"(its axes: {', '.join(map(repr, mesh.axis_names))})")
    return mesh.shape[context_axis]


# Chunks per device of the "balanced" layout when it is named without a ContextLayout:
# 4 brings 64 random-length documents at T = 128k on 8 devices within 1.05 of the mean
# (tests/test_context_parallel.py); each device runs chunks_per_device^2 pairs per step.
BALANCED_CHUNKS_PER_DEVICE = 4


def choose_layout(mod, devices: int, *, q_len: int, kv_len: int, batch: int, heads: int, q_offset, kv_offset,
                  tensors) -> tuple[ContextLayout, PairPlan]:
    """The default layout and its pair plan: for a static mask, the one of contiguous and
    zigzag whose busiest device has less work (``device_work``; contiguous on a tie: fewer,
    larger calls); contiguous for masks that read tensors (their balance depends on the
    values: ``context_layout="balanced"`` deals chunks from them)."""
    contiguous = layout_named("contiguous", devices)
    zigzag = layout_named("zigzag", devices)
    kw = dict(q_len=q_len, kv_len=kv_len, batch=batch, heads=heads, q_offset=q_offset, kv_offset=kv_offset,
              tensors=tensors)
    plan = pair_plan(mod, contiguous, **kw)
    if not plan.is_static or q_len % zigzag.num_chunks or kv_len % zigzag.num_chunks:
        return contiguous, plan
    # Both plans in zigzag's (finer) blocks: work counted in coarser blocks overcounts the
    # partial ones, which would favour zigzag wrongly.
    zig_plan = pair_plan(mod, zigzag, **kw)
    plan = pair_plan(mod, contiguous, max_block=zig_plan.block_q, **kw)
    if device_work(zig_plan, zigzag).max() < device_work(plan, contiguous).max():
        return zigzag, zig_plan
    return contiguous, plan


def resolve_layout(layout, mod, devices: int, *, q_len: int, kv_len: int, batch: int, heads: int, q_offset,
                   kv_offset, tensors) -> tuple[ContextLayout, PairPlan]:
    """``context_layout`` (None, a name or a ContextLayout) as a layout and its pair plan."""
    kw = dict(q_len=q_len, kv_len=kv_len, batch=batch, heads=heads, q_offset=q_offset, kv_offset=kv_offset,
              tensors=tensors)
    if layout is None:
        return choose_layout(mod, devices, **kw)
    if layout == "balanced":
        return balanced_layout(mod, devices, BALANCED_CHUNKS_PER_DEVICE, **kw)
    if isinstance(layout, str):
        layout = layout_named(layout, devices)
    elif not isinstance(layout, ContextLayout):
        raise ScoreModShapeError(f"context_layout must be None, 'contiguous', 'zigzag', 'balanced' or a "
                                 f"ContextLayout; got {type(layout).__name__}")
    if layout.devices != devices:
        raise ScoreModShapeError(f"the context layout is for {layout.devices} devices; the mesh axis has {devices}")
    return layout, pair_plan(mod, layout, **kw)


STRATEGIES = ("ring", "all_gather")


def choose_strategy(strategy, schedule: RingSchedule, *, devices: int, heads: int, kv_heads: int) -> str:
    """``context_strategy``: "ring", "all_gather", or None for the rule: a ring when its
    schedule leaves ring steps out (a window: fewer bytes moved than gathering all K/V);
    else an all-gather when K/V are smaller than the queries (GQA, kv_heads < heads): the
    same bytes as a full ring, in one collective, and one kernel call per q-chunk instead
    of a merge per pair; else a ring (its transfers overlap the pairs' computation)."""
    if strategy is None:
        if len(schedule.shifts) < devices or kv_heads >= heads:
            return "ring"
        return "all_gather"
    if strategy not in STRATEGIES:
        raise ScoreModShapeError(f"context_strategy must be None, 'ring' or 'all_gather'; got {strategy!r}")
    return strategy


def _plan_ring(local_attention, mod, devices: int, *, mesh, context_axis, explicit, layout, strategy, scale,
               B, T, S, N, K, q_offset, kv_offset, implementation, tensors):
    """The Ring (static) and its array inputs (blocks, chunk table) for one call."""
    layout, plan = resolve_layout(layout, mod, devices, q_len=T, kv_len=S, batch=B, heads=N, q_offset=q_offset,
                                  kv_offset=kv_offset, tensors=tensors)
    # A static layout is part of the program; one from tensor values travels as an input
    # (as its plan does), so new values never recompile.
    static_layout = layout if layout.is_static else None
    schedule = ring_schedule(plan, layout) if layout.is_static else RingSchedule(tuple(range(devices)), None)
    ring = Ring(local_attention=local_attention, mod=mod, mesh=mesh, axis=context_axis, explicit=explicit,
                layout=static_layout, chunks_per_device=layout.chunks_per_device,
                inputs_permuted=layout.inputs_permuted, schedule=schedule,
                strategy=choose_strategy(strategy, schedule, devices=devices, heads=N, kv_heads=K),
                q_chunk=plan.q_chunk, kv_chunk=plan.kv_chunk, scale=scale, implementation=implementation,
                names=tuple(sorted(tensors)))
    # Static plans with static layouts are baked into the program (the schedule); otherwise
    # each pair asks the plan, which travels as an input.
    blocks = jnp.zeros((), jnp.int32) if schedule.runs is not None else jnp.asarray(plan.blocks)
    return ring, blocks, jnp.asarray(layout.table())


def context_attention(local_attention, query, key, value, *, mod, mesh, context_axis, layout=None, strategy=None,
                      scale, q_offset, kv_offset, implementation, tensors):
    """(out, lse) of attention over a sequence sharded on ``mesh``'s ``context_axis``.

    Called by ``attention()`` after it has checked the inputs (shapes as there: query
    ``[B, T, N, H]``, key/value ``[B, S, K, H]``, lse ``f32[B, T, N]``), with the call each
    (q-chunk, kv-chunk) pair runs as ``local_attention``; ``layout`` is None
    (``choose_layout``), "contiguous", "zigzag", "balanced" or a ``ContextLayout``;
    ``strategy`` None (``choose_strategy``), "ring" or "all_gather".
    """
    devices = _check_mesh(mesh, context_axis)
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    explicit = mesh.axis_types[mesh.axis_names.index(context_axis)] == jax.sharding.AxisType.Explicit
    if explicit and jax.sharding.get_abstract_mesh() != mesh.abstract_mesh:
        raise ScoreModShapeError(
            f"mesh axis {context_axis!r} is Explicit: call attention inside `with jax.set_mesh(mesh):`",
            hint="or build the mesh with axis_types=(jax.sharding.AxisType.Auto, ...)")
    ring, blocks, table = _plan_ring(local_attention, mod, devices, mesh=mesh, context_axis=context_axis,
                                     explicit=explicit, layout=layout, strategy=strategy, scale=scale, B=B, T=T,
                                     S=S, N=N, K=K, q_offset=q_offset, kv_offset=kv_offset,
                                     implementation=implementation, tensors=tensors)
    q_off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    kv_off = jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (B,))
    out, lse = _run_ring(ring, query, key, value, q_off, kv_off, blocks, table,
                         tuple(tensors[n] for n in ring.names))
    return out.astype(query.dtype), lse


def local_axis_size(context_axis) -> int:
    """P, the size of ``context_axis`` in the enclosing ``jax.shard_map``; a ScoreModShapeError
    when no enclosing shard_map binds it."""
    try:
        return int(lax.axis_size(context_axis))
    except NameError:
        raise ScoreModShapeError(
            f"context_axis={context_axis!r} without mesh= runs on local shards inside a jax.shard_map over that "
            f"axis, and no enclosing shard_map binds it",
            hint="pass mesh= for global arrays, or call attention inside jax.shard_map(..., mesh=mesh)") from None


def local_context_attention(local_attention, query, key, value, *, mod, context_axis, layout=None, strategy=None,
                            scale, q_offset, kv_offset, implementation, tensors):
    """(out, lse) for local shards, called inside the user's ``jax.shard_map`` over
    ``context_axis``: query ``[B, T/P, N, H]`` and key/value ``[B, S/P, K, H]`` are this
    device's chunks of the global sequence in the layout's order (contiguous by default:
    device d holds positions d*T/P ..), tensors are global and replicated, offsets are
    the global sequence's. Returns this device's out and lse."""
    devices = local_axis_size(context_axis)
    B, Tl, N, H = query.shape
    Sl, K = key.shape[1], key.shape[2]
    if isinstance(layout, ContextLayout) and not layout.inputs_permuted:
        layout = layout.with_inputs_permuted()   # local shards are in layout order by definition
    elif layout is None or isinstance(layout, str):
        layout = _local_named_layout(layout, mod, devices, B=B, T=Tl * devices, S=Sl * devices, N=N,
                                     q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    ring, blocks, table = _plan_ring(local_attention, mod, devices, mesh=None, context_axis=context_axis,
                                     explicit=False, layout=layout, strategy=strategy, scale=scale, B=B,
                                     T=Tl * devices, S=Sl * devices, N=N, K=K, q_offset=q_offset,
                                     kv_offset=kv_offset, implementation=implementation, tensors=tensors)
    q_off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    kv_off = jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (B,))
    out, lse = _device_ring(ring, query, key, value, q_off, kv_off, blocks, table,
                            tuple(tensors[n] for n in ring.names))
    return out.astype(query.dtype), lse


def _local_named_layout(name, mod, devices, *, B, T, S, N, q_offset, kv_offset, tensors) -> ContextLayout:
    """Local shards: the data already sits in some layout, so None means contiguous (the
    shards as jax.shard_map cuts a global array), and a name its layout, marked as applied."""
    if name is None or name == "contiguous":
        return layout_named("contiguous", devices).with_inputs_permuted()
    if name == "balanced":
        raise ScoreModShapeError("context_layout='balanced' cannot describe local shards: the data's layout "
                                 "comes from the values", hint="pass the ContextLayout the data was permuted with "
                                 "(scoremod.context_layout(...))")
    return layout_named(name, devices).with_inputs_permuted()


@dataclass(frozen=True)
class Ring:
    """Everything static about one context-parallel call (the jit cache key)."""
    local_attention: Callable
    mod: Any
    mesh: Mesh
    axis: str
    explicit: bool            # the mesh axis is Explicit (run as Auto inside auto_axes)
    layout: ContextLayout | None   # None: the chunk table is an input (a layout from tensor values)
    chunks_per_device: int
    inputs_permuted: bool     # q, k, v come (and the output goes) in layout order
    schedule: RingSchedule
    strategy: str             # "ring" or "all_gather" (choose_strategy)
    q_chunk: int
    kv_chunk: int
    scale: float
    implementation: Any
    names: tuple[str, ...]    # tensor names, in the order their values are passed


@partial(jax.jit, static_argnums=0)
def _run_ring(ring: Ring, query, key, value, q_off, kv_off, blocks, chunk_table, tensor_values):
    seq = P(None, ring.axis)
    in_specs = (seq, seq, seq, P(), P(), P(), P(), tuple(P() for _ in ring.names))
    T, S = query.shape[1], key.shape[1]
    layout = ring.layout if ring.layout is not None else ContextLayout("balanced", chunk_table)
    q_order, kv_order = layout.order(T), layout.order(S)
    if ring.inputs_permuted:
        permuted = False     # the caller keeps the arrays in layout order
    elif ring.layout is None:
        permuted = True
    else:
        permuted = not (np.array_equal(q_order, np.arange(T)) and np.array_equal(kv_order, np.arange(S)))

    def whole(q, k, v, *rest):
        # An Explicit axis runs as Auto in here (auto_axes below), so both kinds of mesh
        # take one path: constraints place the global arrays, shard_map splits them.
        mesh = jax.sharding.get_abstract_mesh() if ring.explicit else ring.mesh
        if permuted:
            q, k, v = q[:, q_order], k[:, kv_order], v[:, kv_order]

        def place(x, spec):
            return lax.with_sharding_constraint(x, spec if ring.explicit else jax.sharding.NamedSharding(mesh, spec))
        args = jax.tree.map(place, (q, k, v, *rest), in_specs)
        out, lse = jax.shard_map(partial(_device_ring, ring), mesh=mesh, in_specs=in_specs, out_specs=(seq, seq),
                                 check_vma=False)(*args)
        if permuted:
            inverse = layout.inverse_order(T)
            out, lse = out[:, inverse], lse[:, inverse]
        return out, lse

    run = jax.sharding.auto_axes(whole, axes=ring.axis, out_sharding=(seq, seq)) if ring.explicit else whole
    return run(query, key, value, q_off, kv_off, blocks, chunk_table, tensor_values)


def _device_ring(ring: Ring, q, k, v, q_off, kv_off, blocks, chunk_of, tensor_values):
    """One device's ring: q ``[B, T/P, N, H]``, k/v ``[B, S/P, K, H]`` (its chunks, in
    layout order); f32 out and lse of its rows. ``chunk_of`` int32 ``[P, chunks per
    device]``: the layout's chunks (replicated)."""
    if ring.strategy == "all_gather":
        return _device_all_gather(ring, q, k, v, q_off, kv_off, chunk_of, tensor_values)
    schedule = ring.schedule
    P_ = chunk_of.shape[0]
    per = ring.chunks_per_device
    qc, kc = ring.q_chunk, ring.kv_chunk
    d = lax.axis_index(ring.axis)
    tensors = dict(zip(ring.names, tensor_values))
    B, _, N, H = q.shape
    outs = [jnp.zeros((B, qc, N, H), jnp.float32) for _ in range(per)]
    lses = [jnp.full((B, qc, N), -jnp.inf, jnp.float32) for _ in range(per)]

    # A plan from tensor values keeps every shift in the program; a shift no device needs
    # (the same answer on every device: its inputs are replicated) sends nothing.
    needed = shifts_needed(blocks, chunk_of) if schedule.runs is None else None
    for step, s in enumerate(schedule.shifts):
        if s == 0:
            ks, vs = k, v
        else:
            perm = [(src, (src + s) % P_) for src in range(P_)]

            def send(perm=perm):
                return lax.ppermute(k, ring.axis, perm), lax.ppermute(v, ring.axis, perm)
            if needed is None:
                ks, vs = send()
            else:
                ks, vs = lax.cond(needed[s], send,
                                  lambda: _varying_like(k, ring.axis, jnp.zeros_like(k), jnp.zeros_like(v)))
        src = (d - s) % P_
        for a in range(per):
            q_chunk = chunk_of[d, a]
            for b in range(per):
                kv_chunk = chunk_of[src, b]
                if schedule.runs is None:
                    run, always = jnp.any(blocks[:, :, q_chunk, kv_chunk] > 0), False
                else:
                    runs = np.array([schedule.runs[step][dev][a][b] for dev in range(P_)])
                    if not runs.any():
                        continue
                    run, always = jnp.asarray(runs)[d], bool(runs.all())

                def pair(a=a, b=b, q_chunk=q_chunk, kv_chunk=kv_chunk, ks=ks, vs=vs):
                    o, l = ring.local_attention(
                        q[:, a * qc:(a + 1) * qc], ks[:, b * kc:(b + 1) * kc], vs[:, b * kc:(b + 1) * kc],
                        mod=ring.mod, scale=ring.scale, q_offset=q_off + q_chunk * qc,
                        kv_offset=kv_off + kv_chunk * kc, implementation=ring.implementation, return_lse=True,
                        **tensors)
                    return o.astype(jnp.float32), l

                def nothing():
                    return _varying_like(q, ring.axis, jnp.zeros((B, qc, N, H), jnp.float32),
                                         jnp.full((B, qc, N), -jnp.inf, jnp.float32))

                o, l = pair() if always else lax.cond(run, pair, nothing)
                outs[a], lses[a] = merge_partials(outs[a], lses[a], o, l)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _device_all_gather(ring: Ring, q, k, v, q_off, kv_off, chunk_of, tensor_values):
    """One device's all-gather strategy: K/V of every device gathered once (back in
    sequence order), then one call per q-chunk against all of it (the kernel skips the
    empty blocks itself; no merges). Its transpose reduce-scatters dK/dV home."""
    per, qc = ring.chunks_per_device, ring.q_chunk
    d = lax.axis_index(ring.axis)
    tensors = dict(zip(ring.names, tensor_values))
    k_all = lax.all_gather(k, ring.axis, axis=1, tiled=True)        # [B, S, K, H] in layout order
    v_all = lax.all_gather(v, ring.axis, axis=1, tiled=True)
    S = k_all.shape[1]
    layout = ring.layout if ring.layout is not None else ContextLayout("balanced", chunk_of)
    if not layout.is_static or not np.array_equal(layout.order(S), np.arange(S)):
        inverse = layout.inverse_order(S)
        k_all, v_all = k_all[:, inverse], v_all[:, inverse]
    outs, lses = [], []
    for a in range(per):
        o, l = ring.local_attention(
            q[:, a * qc:(a + 1) * qc], k_all, v_all, mod=ring.mod, scale=ring.scale,
            q_offset=q_off + chunk_of[d, a] * qc, kv_offset=kv_off, implementation=ring.implementation,
            return_lse=True, **tensors)
        outs.append(o.astype(jnp.float32))
        lses.append(l)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _varying_like(ref, axis, *values):
    """``values`` typed as varying over ``axis`` when ``ref`` is (inside a user's shard_map
    that checks varying-manual-axes types, both branches of a ``lax.cond`` must agree);
    values already varying, or outside such a shard_map, are returned unchanged."""
    if axis not in _varying_axes(ref):
        return values
    return tuple(x if axis in _varying_axes(x) else lax.pcast(x, axis, to="varying") for x in values)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)     # jax 0.10-0.11; older releases: .vma
    return manual.varying if manual is not None else getattr(aval, "vma", frozenset())
