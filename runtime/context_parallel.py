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
                                            layout_named, pair_plan, ring_schedule)

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
    zig_plan = pair_plan(mod, zigzag, **kw)
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


def context_attention(local_attention, query, key, value, *, mod, mesh, context_axis, layout=None, scale,
                      q_offset, kv_offset, implementation, tensors):
    """(out, lse) of attention over a sequence sharded on ``mesh``'s ``context_axis``.

    Called by ``attention()`` after it has checked the inputs (shapes as there: query
    ``[B, T, N, H]``, key/value ``[B, S, K, H]``, lse ``f32[B, T, N]``), with the call each
    (q-chunk, kv-chunk) pair runs as ``local_attention``; ``layout`` is None
    (``choose_layout``), "contiguous", "zigzag", "balanced" or a ``ContextLayout``.
    """
    devices = _check_mesh(mesh, context_axis)
    B, T, N, H = query.shape
    S = key.shape[1]
    layout, plan = resolve_layout(layout, mod, devices, q_len=T, kv_len=S, batch=B, heads=N, q_offset=q_offset,
                                  kv_offset=kv_offset, tensors=tensors)
    explicit = mesh.axis_types[mesh.axis_names.index(context_axis)] == jax.sharding.AxisType.Explicit
    if explicit and jax.sharding.get_abstract_mesh() != mesh.abstract_mesh:
        raise ScoreModShapeError(
            f"mesh axis {context_axis!r} is Explicit: call attention inside `with jax.set_mesh(mesh):`",
            hint="or build the mesh with axis_types=(jax.sharding.AxisType.Auto, ...)")
    # A static layout is part of the program; one from tensor values travels as an input
    # (as its plan does), so new values never recompile.
    static_layout = layout if layout.is_static else None
    schedule = ring_schedule(plan, layout) if layout.is_static else RingSchedule(tuple(range(devices)), None)
    ring = Ring(local_attention=local_attention, mod=mod, mesh=mesh, axis=context_axis, explicit=explicit,
                layout=static_layout, chunks_per_device=layout.chunks_per_device,
                inputs_permuted=layout.inputs_permuted, schedule=schedule, q_chunk=plan.q_chunk,
                kv_chunk=plan.kv_chunk, scale=scale, implementation=implementation, names=tuple(sorted(tensors)))
    q_off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    kv_off = jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (B,))
    # Static plans with static layouts are baked into the program (the schedule); otherwise
    # each pair asks the plan, which travels as an input.
    blocks = jnp.zeros((), jnp.int32) if schedule.runs is not None else jnp.asarray(plan.blocks)
    out, lse = _run_ring(ring, query, key, value, q_off, kv_off, blocks, jnp.asarray(layout.table()),
                         tuple(tensors[n] for n in ring.names))
    return out.astype(query.dtype), lse


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
    schedule = ring.schedule
    P_ = chunk_of.shape[0]
    per = ring.chunks_per_device
    qc, kc = ring.q_chunk, ring.kv_chunk
    d = lax.axis_index(ring.axis)
    tensors = dict(zip(ring.names, tensor_values))
    B, _, N, H = q.shape
    outs = [jnp.zeros((B, qc, N, H), jnp.float32) for _ in range(per)]
    lses = [jnp.full((B, qc, N), -jnp.inf, jnp.float32) for _ in range(per)]

    for step, s in enumerate(schedule.shifts):
        if s == 0:
            ks, vs = k, v
        else:
            perm = [(src, (src + s) % P_) for src in range(P_)]
            ks, vs = lax.ppermute(k, ring.axis, perm), lax.ppermute(v, ring.axis, perm)
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
                    return jnp.zeros((B, qc, N, H), jnp.float32), jnp.full((B, qc, N), -jnp.inf, jnp.float32)

                o, l = pair() if always else lax.cond(run, pair, nothing)
                outs[a], lses[a] = merge_partials(outs[a], lses[a], o, l)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)
