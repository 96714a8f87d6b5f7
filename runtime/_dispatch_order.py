"""What ``attention(implementation=None)`` runs, without jax: the order it tries the
implementations in, the xla path's tile sizes (``XlaBlockSizes``), and ``dispatch_summary``,
the paragraph ``dslc explain`` prints about it. Nothing here imports jax, so explaining a
static mask never loads it (``runtime/_dispatch.py`` and ``runtime/xla.py`` use these)."""

from __future__ import annotations

from dataclasses import dataclass

from scoremod.errors import ScoreModShapeError
from scoremod.compiler.canonical import Canonical
from scoremod.compiler.mod import Mod
from scoremod.compiler.reads import kernel_support, program_reads

__all__ = ["ATTENTION_ON_GPU", "ATTENTION_ELSEWHERE", "XlaBlockSizes", "dispatch_summary"]

# What attention() tries when implementation=None, in order.
ATTENTION_ON_GPU = ("mosaic", "pallas", "xla")
ATTENTION_ELSEWHERE = ("xla",)


@dataclass(frozen=True)
class XlaBlockSizes:
    """Tile sizes of the xla path: ``block_q`` query rows by ``block_kv`` key columns.

    Powers of two (block plans take powers of two); each is clamped to the smallest power
    of two covering T (resp. S), and the last block is padded.
    """
    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise ScoreModShapeError(f"{name}={value!r} must be a power of two")

    @classmethod
    def get_default(cls) -> "XlaBlockSizes":
        return cls()


def _kernel_support(canonical: Canonical) -> tuple[tuple[bool, str], tuple[bool, str]]:
    """``TileProgram.kernel_support()`` of ``canonical``, without and with gathers (what mosaic
    and pallas check), from ``compiler.reads`` (which loads no jax)."""
    reads = program_reads(canonical, {})
    return kernel_support(canonical, reads), kernel_support(canonical, reads, gathers=True)


def dispatch_summary(mod: Mod) -> str:
    """One paragraph for ``dslc explain``: what ``attention(implementation=None)`` would
    run for ``mod`` on an sm_90 GPU and elsewhere, from the same order and the same
    kernel-support check that dispatch uses."""
    canonical = mod.canonical
    (ok, why), (gathers_ok, gathers_why) = _kernel_support(canonical)
    visits = ("every block (no mask)" if not canonical.has_mask else
              "only non-empty blocks, evaluating the mask on PARTIAL ones only")
    extras = []
    if canonical.bias is not None:
        extras.append("the bias is added inside the kernel")
    if canonical.transform is not None:
        extras.append("the transform runs on each score tile (its derivative in score in the backward)")
    if ok:
        kernels = (f"on a GPU, {' then '.join(ATTENTION_ON_GPU)}: the block-sparse kernels visit {visits}"
                   + "".join(f"; {e}" for e in extras)
                   + " (mosaic: sm_90 only, forward and backward)")
    elif gathers_ok:
        kernels = (f"on a GPU, mosaic declines it ({why}), so pallas runs it, then {ATTENTION_ON_GPU[-1]}: "
                   f"the block-sparse kernel visits {visits}, gathering each tile's table entries at the "
                   "computed indices" + "".join(f"; {e}" for e in extras))
    else:
        kernels = (f"the kernels decline it ({gathers_why}), so {ATTENTION_ON_GPU[-1]} runs it on a GPU too")
    if canonical.tensors:
        plan = f"the block plan is built on device from {', '.join(canonical.tensors)} (new values never recompile)"
    else:
        plan = "the block plan is static (built once with NumPy at trace time, cached)"
    chunk = XlaBlockSizes.get_default()
    text = (f"{kernels}; {plan}. The grid below is drawn for the kernels' blocks. Elsewhere (CPU, TPU): "
            f"{' then '.join(ATTENTION_ELSEWHERE)}, the chunked path in {chunk.block_q} x {chunk.block_kv} "
            f"tiles (--block {chunk.block_q},{chunk.block_kv} draws those), O(T x chunk) memory.")
    if canonical.transform is None and canonical.bias is None and str(canonical.mask) in ("true", "q >= kv"):
        text += " cudnn can run it too (implementation='cudnn')."
    return text
