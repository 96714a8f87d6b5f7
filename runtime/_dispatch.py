"""What ``attention`` and ``paged_attention`` share before they pick a kernel: reading the
``mod`` argument and the ``implementation`` argument."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from scoremod.errors import ScoreModError
from scoremod.compiler.mod import Mod, compile_mod

NO_MASK = "true"


def as_mod(mod) -> Mod:
    """``mod`` (a source string, a ``Mod`` or None = no mask) as a compiled ``Mod``."""
    if mod is None:
        return compile_mod(NO_MASK)
    if not isinstance(mod, (str, Mod)):
        raise ScoreModError(f"mod must be a source string, a scoremod.Mod or None; got "
                            f"{type(mod).__name__}", hint='for example mod="causal & window(1024)"')
    return compile_mod(mod)


def implementation_names(implementation, *, known: tuple[str, ...], on_gpu: tuple[str, ...],
                         elsewhere: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The implementations to try, in order. ``None`` means the best for this device
    (``on_gpu`` or ``elsewhere``); a name or a sequence of names is checked against ``known``."""
    if implementation is None:
        return on_gpu if jax.default_backend() == "gpu" else elsewhere
    names = (implementation,) if isinstance(implementation, str) else implementation
    if not isinstance(names, Sequence) or not names:
        raise ScoreModError(f"implementation must be None, a name or a non-empty sequence of names; "
                            f"got {implementation!r}", hint=f"names: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise ScoreModError(f"unknown implementation {name!r} for {what}; expected one of "
                                f"{', '.join(known)} (or None for the best available)")
    return tuple(names)
