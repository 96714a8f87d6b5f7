"""Export a mod to PyTorch FlexAttention: the source of a self-contained Python module.

``flex_module_source(mod)`` walks the same checked, expanded canonical IR that
``compiler/lowering.py`` lowers to jax.numpy (``emit``), and writes torch source text
instead of jnp calls. The generated module defines

* ``make_mods(*, q_offset=0, kv_offset=0, **tensors)``: ``{"score_mod": fn or None,
  "mask_mod": fn or None}``, FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)`` and
  ``mask_mod(b, h, q_idx, kv_idx)`` closing over the tensors;
* ``block_mask(B, H, Q_LEN, KV_LEN, *, device="cpu", BLOCK_SIZE=128, q_offset=0,
  kv_offset=0, **tensors)``: ``create_block_mask`` for the mask part (None without one);
* ``SOURCE``, ``KIND``, ``TENSORS``: the canonical source, its kind and the tensors it reads.

The meaning is the reference's (docs/language.md): int32 integers with Python's floor
``//`` and ``%``, float32 reals, indices aligned right and clipped, float -> int
conversion saturating with NaN -> 0 (as XLA converts). The canonical mask's conjuncts
that do not read ``score`` go to ``mask_mod`` (they decide block sparsity); conjuncts that
read ``score`` go to ``score_mod`` as ``-inf``. What the generated module cannot express
is refused with a ``ScoreModError`` naming it (docs/export.md). This module produces text
only: it never imports torch; the generated module does.
"""

from __future__ import annotations

import math
import struct

from scoremod.errors import ScoreModError
from scoremod.dsl.ast import (
    Binary, BoolLit, Call, IntLit, Node, RealLit, Tensor, Unary, Var, deep_recursion, mentions, walk,
)
from scoremod.dsl.typecheck import BOOL, INT, NUM, REAL, promote
from scoremod.compiler.canonical import conjuncts

__all__ = ["flex_module_source", "RESERVED_TENSOR_NAMES"]

# Keywords of the generated block_mask(); a tensor parameter of the same name could not be
# passed to it (q_offset and kv_offset are already reserved by the language).
RESERVED_TENSOR_NAMES = ("device", "BLOCK_SIZE")

_DTYPE = {BOOL: "torch.bool", INT: "torch.int32", REAL: "torch.float32"}

_REAL_FUNCS = {"exp": "torch.exp", "exp2": "torch.exp2", "log": "torch.log", "log2": "torch.log2",
               "sqrt": "torch.sqrt", "tanh": "torch.tanh", "sigmoid": "torch.sigmoid",
               "sin": "torch.sin", "cos": "torch.cos"}

_COMPARE = ("<", "<=", ">", ">=", "==", "!=")


def _float32_text(value: float) -> str:
    """A Python literal holding exactly the float32 value of ``value`` (the language's reals)."""
    if math.isnan(value):
        return "float('nan')"
    if math.isinf(value):
        return "float('inf')" if value > 0 else "-float('inf')"
    return repr(struct.unpack("<f", struct.pack("<f", value))[0])


class _Value:
    """An emitted expression: its text (an SSA name or a Python literal), its language type
    (bool / int / real / num) and, for a Python literal rather than a tensor, its value."""
    __slots__ = ("text", "type", "literal", "value")

    def __init__(self, text: str, type_: str, literal: bool = False, value=None):
        self.text = text
        self.type = type_
        self.literal = literal
        self.value = value


def _literal(value, type_: str) -> _Value:
    """A Python literal of the language's ``type_`` (ints wrap to int32; reals are float32)."""
    if type_ == BOOL:
        text = "True" if value else "False"
    elif type_ == INT:
        value = (int(value) + 2**31) % 2**32 - 2**31
        text = str(value) if value >= 0 else f"({value})"
    else:
        value = float(value)
        text = _float32_text(value)
        text = f"({text})" if text.startswith("-") else text
    return _Value(text, type_, literal=True, value=value)


class _Emitter:
    """Writes the body of one mod function as SSA lines ``vN = ...``.

    Every non-literal value is a tensor of dtype bool, int32 or float32 (num: int32 or
    float32, fixed by a tensor's dtype at run time), so torch's promotion between them is
    the language's (int with real gives real). Literals stay Python numbers where torch
    takes them with that meaning, and become 0-d tensors (``torch.full``) where it does not.
    """

    def __init__(self, variables: dict[str, str]):
        self.variables = variables   # language variable -> local name in the function
        self.lines: list[str] = []
        self.helpers: set[str] = set()
        self.used_vars: set[str] = set()
        self.uses_device = False
        self.count = 0
        self.memo: dict[int, _Value] = {}

    # -- values ---------------------------------------------------------------------------

    def assign(self, text: str, type_: str) -> _Value:
        name = f"v{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {text}")
        return _Value(name, type_)

    def tensor(self, v: _Value, type_: str | None = None) -> str:
        """``v`` as a tensor (a literal becomes a 0-d tensor of ``type_``, default its own)."""
        if not v.literal:
            return v.text
        self.uses_device = True
        dtype = _DTYPE[type_ or v.type]
        return self.assign(f"torch.full((), {v.text}, dtype={dtype}, device=dev)", type_ or v.type).text

    def real(self, v: _Value) -> str:
        """``v`` as float32 (the language promotes ints to reals)."""
        if v.literal:
            return _literal(v.value, REAL).text
        return v.text if v.type == REAL else f"{v.text}.to(torch.float32)"

    def as_type(self, v: _Value, type_: str) -> str:
        """``v`` where a value of ``type_`` is expected: reals are cast to float32; ints and
        nums are left to torch's promotion, which matches the language's."""
        return self.real(v) if type_ == REAL else v.text

    def pair(self, a: _Value, b: _Value, type_: str) -> tuple[str, str]:
        """Two operands of a binary operation on ``type_``; two literals: the left one a tensor."""
        if a.literal and b.literal:
            return self.tensor(a, REAL if type_ == REAL else a.type), self.as_type(b, type_)
        return self.as_type(a, type_), self.as_type(b, type_)

    def both_tensors(self, a: _Value, b: _Value, type_: str) -> tuple[str, str]:
        """Two tensor operands (torch.minimum and torch.logical_and take no Python numbers)."""
        ta = self.tensor(a, REAL if type_ == REAL else None) if a.literal else self.as_type(a, type_)
        tb = self.tensor(b, REAL if type_ == REAL else None) if b.literal else self.as_type(b, type_)
        return ta, tb

    # -- the walk -------------------------------------------------------------------------

    def emit(self, root: Node) -> _Value:
        """Emit ``root`` (post-order, iterative, memoised by node identity like ``emit``)."""
        stack = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if id(node) in self.memo:
                continue
            if ready:
                self.memo[id(node)] = self.one(node)
                continue
            stack.append((node, True))
            for child in reversed(node.children()):
                if id(child) not in self.memo:
                    stack.append((child, False))
        return self.memo[id(root)]

    def one(self, n: Node) -> _Value:
        go = lambda child: self.memo[id(child)]  # noqa: E731
        if isinstance(n, BoolLit):
            return _literal(n.value, BOOL)
        if isinstance(n, IntLit):
            return _literal(n.value, INT)
        if isinstance(n, RealLit):
            return _literal(n.value, REAL)
        if isinstance(n, Var):
            self.used_vars.add(n.name)
            return _Value(self.variables[n.name], REAL if n.name == "score" else INT)
        if isinstance(n, Tensor):
            self.helpers.add("_read")
            indices = [go(i) for i in n.indices]
            args = "".join(f", {i.text}" for i in indices)
            return self.assign(f"_read(p_{n.name}{args})", NUM)
        if isinstance(n, Unary):
            x = go(n.operand)
            if n.op == "~":
                return self.assign(f"torch.logical_not({self.tensor(x)})", BOOL)
            if x.literal:
                return _literal(-x.value, x.type)
            return self.assign(f"-{x.text}", x.type)
        if isinstance(n, Binary):
            return self.binary(n.op, go(n.lhs), go(n.rhs))
        if isinstance(n, Call):
            return self.call(n.fn, [go(a) for a in n.args])
        raise TypeError(f"cannot export {type(n).__name__}")

    def binary(self, op: str, a: _Value, b: _Value) -> _Value:
        if op in ("&", "+") and a.type == BOOL and b.type == BOOL:
            return self.assign("torch.logical_and({}, {})".format(*self.both_tensors(a, b, BOOL)), BOOL)
        if op == "|":
            return self.assign("torch.logical_or({}, {})".format(*self.both_tensors(a, b, BOOL)), BOOL)
        if op in _COMPARE:
            type_ = BOOL if a.type == BOOL else promote(a.type, b.type)
            x, y = self.pair(a, b, type_)
            return self.assign(f"{x} {op} {y}", BOOL)
        if op in ("/", "**"):
            x, y = self.pair(a, b, REAL)
            return self.assign(f"{x} / {y}" if op == "/" else f"torch.pow({x}, {y})", REAL)
        type_ = promote(a.type, b.type)
        if op in ("+", "-", "*"):
            x, y = self.pair(a, b, type_)
            return self.assign(f"{x} {op} {y}", type_)
        if op in ("//", "%"):
            if type_ == REAL:
                x, y = self.pair(a, b, REAL)
                if op == "//":
                    return self.assign(f"torch.floor({x} / {y})", REAL)
                return self.assign(f"{x} - torch.floor({x} / {y}) * {y}", REAL)
            if type_ == NUM:   # int or real at run time: decided by the helper
                helper = "_floordiv" if op == "//" else "_mod"
                self.helpers.update({helper, "_divisor"})
                return self.assign(f"{helper}({self.tensor(a, INT)}, {self.tensor(b, INT)})", NUM)
            x = self.tensor(a, INT)
            if b.literal and b.value != 0:
                y = b.text
            else:   # a zero divisor gives some value, never an error (docs/language.md, "8. Arithmetic")
                self.helpers.add("_divisor")
                y = f"_divisor({self.tensor(b, INT)})"
            if op == "//":
                return self.assign(f"torch.div({x}, {y}, rounding_mode='floor')", INT)
            return self.assign(f"torch.remainder({x}, {y})", INT)
        raise TypeError(f"cannot export operator {op!r}")

    def call(self, fn: str, args: list[_Value]) -> _Value:
        if fn == "where":
            c, a, b = args
            type_ = BOOL if a.type == BOOL else promote(a.type, b.type)
            if type_ == BOOL:
                x, y = self.both_tensors(a, b, BOOL)
            else:
                x, y = self.pair(a, b, type_)
            return self.assign(f"torch.where({self.tensor(c)}, {x}, {y})", type_)
        if fn in ("min", "max"):
            type_ = promote(args[0].type, args[1].type)
            x, y = self.both_tensors(args[0], args[1], type_)
            return self.assign(f"torch.{'minimum' if fn == 'min' else 'maximum'}({x}, {y})", type_)
        if fn == "clip":
            type_ = promote(promote(args[0].type, args[1].type), args[2].type)
            x, lo = self.both_tensors(args[0], args[1], type_)
            hi = self.tensor(args[2], REAL if type_ == REAL else None) if args[2].literal else self.as_type(args[2], type_)
            return self.assign(f"torch.minimum(torch.maximum({x}, {lo}), {hi})", type_)
        x = args[0]
        if fn in ("floor", "ceil"):
            if x.type == INT:
                return x
            self.helpers.add(f"_{fn}")
            return self.assign(f"_{fn}({self.tensor(x)})", INT if x.type == REAL else NUM)
        if fn == "abs":
            return self.assign(f"torch.abs({self.tensor(x)})", x.type)
        if fn == "sign":
            if x.type == INT:
                return self.assign(f"torch.sign({self.tensor(x)})", INT)
            self.helpers.add("_sign")
            return self.assign(f"_sign({self.tensor(x)})", x.type)
        if fn in _REAL_FUNCS:
            arg = self.tensor(x, REAL) if x.literal else self.real(x)
            return self.assign(f"{_REAL_FUNCS[fn]}({arg})", REAL)
        raise TypeError(f"cannot export function {fn!r}")


# ---- helpers the generated module may need (each included only when used) ----------------

_HELPERS = {
    "_read": '''
def _read(t, *indices):
    """t[indices] as the language reads tensors: indices align to the right (a rank-r tensor
    uses the last r), each is clipped to the axis; ints and bools read as int32, floats as float32."""
    used = indices[len(indices) - t.dim():] if t.dim() else ()
    index = tuple(_clip_index(i, n) for i, n in zip(used, t.shape))
    value = t[index] if index else t
    return value.to(torch.float32) if value.is_floating_point() else value.to(torch.int32)


def _clip_index(i, n):
    if isinstance(i, int):
        return min(max(i, 0), n - 1)
    if i.is_floating_point():
        i = _to_int32(i)
    return torch.clamp(i.to(torch.int32), 0, n - 1)
''',
    "_to_int32": '''
def _to_int32(x):
    """float32 -> int32 as XLA converts: toward zero, saturating, NaN -> 0."""
    big, small = x >= 2147483648.0, x < -2147483648.0
    y = torch.where(big | small | torch.isnan(x), 0.0, x).to(torch.int32)
    return torch.where(big, 2147483647, torch.where(small, -2147483648, y))
''',
    "_floor": '''
def _floor(x):
    return _to_int32(torch.floor(x)) if x.is_floating_point() else x
''',
    "_ceil": '''
def _ceil(x):
    return _to_int32(torch.ceil(x)) if x.is_floating_point() else x
''',
    "_sign": '''
def _sign(x):
    """sign with jnp's meaning on floats: NaN stays NaN, -0.0 stays -0.0."""
    if not x.is_floating_point():
        return torch.sign(x)
    return torch.where(torch.isnan(x) | (x == 0), x, torch.sign(x))
''',
    "_divisor": '''
def _divisor(d):
    """An int divisor with 0 replaced by 1: integer division by zero is undefined in the
    language (any value), and torch raises on the CPU where jnp does not."""
    return torch.where(d == 0, 1, d) if not d.is_floating_point() else d
''',
    "_floordiv": '''
def _floordiv(a, b):
    """a // b on values whose dtypes are known only at run time (tensor elements)."""
    if a.is_floating_point() or b.is_floating_point():
        a, b = a.to(torch.float32), b.to(torch.float32)
        return torch.floor(a / b)
    return torch.div(a, _divisor(b), rounding_mode="floor")
''',
    "_mod": '''
def _mod(a, b):
    """a % b on values whose dtypes are known only at run time (tensor elements)."""
    if a.is_floating_point() or b.is_floating_point():
        a, b = a.to(torch.float32), b.to(torch.float32)
        return a - torch.floor(a / b) * b
    return torch.remainder(a, _divisor(b))
''',
}

# Helpers other helpers call.
_HELPER_NEEDS = {"_read": {"_to_int32"}, "_floor": {"_to_int32"}, "_ceil": {"_to_int32"},
                 "_floordiv": {"_divisor"}, "_mod": {"_divisor"}}

_ALWAYS = '''
def _tensor(tensors, name, rank, mask=False):
    """A tensor parameter as a torch tensor; ``rank``: the fewest indices it is read with;
    ``mask``: the source reads it as a mask by itself (``m[...]`` meaning ``m[...] != 0``)."""
    value = tensors[name]
    value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if value.is_complex():
        raise ValueError(f"tensor {name!r} has dtype {value.dtype}; expected int, float or bool")
    if mask and value.is_floating_point():
        raise ValueError(f"tensor {name!r} has dtype {value.dtype}, but the mod reads it as a mask "
                         f"(read != 0); a mask tensor must be bool or int")
    if value.dim() > rank:
        raise ValueError(f"tensor {name!r} of shape {list(value.shape)} has rank {value.dim()}, "
                         f"but it is read with {rank} indices")
    if value.numel() == 0:
        raise ValueError(f"tensor {name!r} is empty (shape {list(value.shape)})")
    return value


def _offset(name, value):
    """q_offset / kv_offset: an int, or an int tensor of shape [B] (indexed by b)."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        value = torch.as_tensor(value)
    if isinstance(value, int):
        if not -2**31 <= value < 2**31:
            raise ValueError(f"{name}={value} does not fit in int32")
        return value
    if value.dim() > 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an int or an int tensor of shape [B], got {value.dtype}{list(value.shape)}")
    return value.to(torch.int32)


def _position(idx, offset, b):
    """Absolute position ``offset + idx`` in int32 (docs/language.md, "6. Positions")."""
    idx = idx.to(torch.int32)
    if isinstance(offset, int):
        return idx + offset if offset else idx
    return idx + (offset[b] if offset.dim() else offset)


def _check_names(tensors):
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise TypeError(f"missing tensor parameter {missing[0]!r}; this mod reads {', '.join(TENSORS)}")
    extra = [name for name in tensors if name not in TENSORS + _IGNORED_TENSORS]
    if extra:
        raise TypeError(f"unexpected tensor parameter {extra[0]!r}; this mod reads "
                        f"{', '.join(TENSORS) or 'no tensors'}")
'''


# ---- the module -----------------------------------------------------------------------------

def _refuse(mod, message: str, node: Node | None = None, hint: str | None = None):
    """Raise the ScoreModError for what the export cannot express, with a caret under ``node``."""
    source = mod.source or str(mod)
    span = node.span if node is not None and mod.source else None
    raise ScoreModError(f"cannot export to FlexAttention: {message}", source=source, span=span, hint=hint)


def _function(name: str, params: str, emitter: _Emitter, result: list[str], indent: str) -> list[str]:
    """``def name(params):`` with the variables it uses set up, the SSA lines, and ``result``."""
    head = []
    used = emitter.used_vars
    if "score" in used:
        head.append("s = score.to(torch.float32)")
    if "b" in used:
        head.append("b32 = b.to(torch.int32)")
    if "h" in used:
        head.append("h32 = h.to(torch.int32)")
    if "q" in used:
        head.append("q = _position(q_idx, q_offset, b)")
    if "kv" in used:
        head.append("kv = _position(kv_idx, kv_offset, b)")
    if emitter.uses_device:
        head.append("dev = q_idx.device")
    body = head + emitter.lines + result
    inner = indent + "    "
    return [f"{indent}def {name}({params}):"] + [inner + line for line in body]


_VARIABLES = {"b": "b32", "h": "h32", "q": "q", "kv": "kv", "score": "s"}


def _read_ranks(mod) -> dict[str, int]:
    """For each tensor the mod reads: the fewest indices it is read with (its largest rank)."""
    ranks: dict[str, int] = {}
    for part in (mod.canonical.mask, mod.canonical.transform, mod.canonical.bias):
        if part is None:
            continue
        stack = [part]
        while stack:
            n = stack.pop()
            if isinstance(n, Tensor):
                ranks[n.name] = min(ranks.get(n.name, len(n.indices)), len(n.indices))
            stack.extend(n.children())
    return {name: ranks[name] for name in mod.tensors}


def flex_module_source(mod) -> str:
    """The source of a Python module with FlexAttention mods meaning what ``mod`` means.

    Args:
      mod: a compiled ``scoremod.Mod`` (or a source string).

    Returns:
      Python source (a str) importing torch; see docs/export.md for its API.

    Raises:
      ScoreModError: what the generated module cannot express, naming the construct.

    Example::

        >>> src = flex_module_source(scoremod.compile("causal & window(256) + alibi(8)"))
        >>> namespace = {}; exec(src, namespace)
        >>> mods = namespace["make_mods"]()
        >>> bm = namespace["block_mask"](1, 8, 1024, 1024, device="cuda")
        >>> out = flex_attention(q, k, v, score_mod=mods["score_mod"], block_mask=bm)
    """
    from scoremod.compiler.mod import compile_mod   # mod imports this module: a cycle
    mod = compile_mod(mod)
    for node in walk(mod.expr if mod.expr is not None else mod.canonical.as_node()):
        if isinstance(node, Tensor) and node.name in RESERVED_TENSOR_NAMES:
            _refuse(mod, f"tensor parameter '{node.name}' has the name of block_mask()'s {node.name}= keyword",
                    node, hint=f"rename the tensor, e.g. '{node.name}_'")
    with deep_recursion():
        return _module_text(mod)


def _module_text(mod) -> str:
    canonical = mod.canonical
    mask_parts, score_mask_parts = [], []
    if canonical.has_mask:
        for part in conjuncts(canonical.mask):
            (score_mask_parts if mentions(part, "score") else mask_parts).append(part)
    has_score_mod = canonical.transform is not None or canonical.bias is not None or bool(score_mask_parts)
    helpers: set[str] = set()
    indent = "    "

    functions: list[str] = []
    if has_score_mod:
        e = _Emitter(_VARIABLES)
        e.used_vars.add("score")
        if canonical.transform is None:
            value = "s"
        else:
            t = e.emit(canonical.transform)
            value = e.tensor(t, REAL) if t.literal else e.real(t)
        if canonical.bias is not None:
            bias = e.emit(canonical.bias)
            value = e.assign(f"{value} + {e.real(bias)}", REAL).text
        if score_mask_parts:   # a mask that reads score: -inf here, not in mask_mod
            keep = e.emit(_and(score_mask_parts))
            value = e.assign(f"torch.where({e.tensor(keep)}, {value}, -float('inf'))", REAL).text
        helpers |= e.helpers
        functions += _function("score_mod", "score, b, h, q_idx, kv_idx", e,
                               [f"return {value}.to(score.dtype)"], indent) + [""]
    if mask_parts:
        e = _Emitter(_VARIABLES)
        keep = e.emit(_and(mask_parts))
        helpers |= e.helpers
        functions += _function("mask_mod", "b, h, q_idx, kv_idx", e, [f"return {e.tensor(keep)}"], indent) + [""]

    for name in list(helpers):
        helpers |= _HELPER_NEEDS.get(name, set())
    ranks = _read_ranks(mod)
    ignored = tuple(n for n in mod.source_tensors if n not in mod.tensors)
    from scoremod import __version__

    out = [
        f"# Generated by scoremod {__version__} (Mod.to_flex(), `dslc export --to flex`); do not edit.",
        "# The canonical form of the mod (docs/language.md):",
        f"#     {mod}",
        '"""FlexAttention score_mod / mask_mod for a scoremod mod (see scoremod\'s docs/export.md).',
        "",
        "    mods = make_mods(**tensors)           # {'score_mod': fn or None, 'mask_mod': fn or None}",
        "    bm = block_mask(B, H, Q_LEN, KV_LEN, device='cuda', **tensors)   # a BlockMask, or None",
        "    out = flex_attention(q, k, v, score_mod=mods['score_mod'], block_mask=bm)",
        "",
        "Positions are absolute (q = q_offset + q_idx, kv = kv_offset + kv_idx); integers are int32",
        "with Python's floor // and %, reals float32, tensor indices align right and are clipped.",
        '"""',
        "",
        "import torch",
        "from torch.nn.attention.flex_attention import create_block_mask",
        "",
        f"SOURCE = {str(mod)!r}",
        f"KIND = {mod.kind!r}",
        f"TENSORS = {tuple(mod.tensors)!r}",
        "# Named by the source but unused after simplification: accepted and ignored.",
        f"_IGNORED_TENSORS = {ignored!r}",
        "",
        "",
        "def make_mods(*, q_offset=0, kv_offset=0, **tensors):",
        '    """FlexAttention mods closing over the tensor parameters (keywords named as in TENSORS).',
        "",
        "    Returns {'score_mod': score_mod(score, b, h, q_idx, kv_idx) or None,",
        "             'mask_mod': mask_mod(b, h, q_idx, kv_idx) or None}.",
        "    q_offset, kv_offset: int or int tensor [B]; q = q_offset + q_idx, kv = kv_offset + kv_idx.",
        "",
        "        >>> mods = make_mods(**tensors)",
        "        >>> flex_attention(q, k, v, score_mod=mods['score_mod'], block_mask=block_mask(B, H, T, S, **tensors))",
        '    """',
        "    _check_names(tensors)",
    ]
    for name, rank in ranks.items():
        mask = ", mask=True" if name in getattr(mod, "mask_reads", ()) else ""
        out.append(f"    p_{name} = _tensor(tensors, {name!r}, {rank}{mask})")
    out += [
        "    q_offset = _offset('q_offset', q_offset)",
        "    kv_offset = _offset('kv_offset', kv_offset)",
        "",
    ]
    out += functions
    out += [
        f"    return {{'score_mod': {'score_mod' if has_score_mod else 'None'}, "
        f"'mask_mod': {'mask_mod' if mask_parts else 'None'}}}",
        "",
        "",
        "def block_mask(B, H, Q_LEN, KV_LEN, *, device='cpu', BLOCK_SIZE=128, q_offset=0, kv_offset=0, **tensors):",
        '    """create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE) for the',
        "    mod's mask, or None when it has none (then pass block_mask=None to flex_attention).",
        "",
        "    B / H may be None (broadcast) only when the mask does not depend on b / h. Tensors and",
        "    offsets as for make_mods.",
        "",
        "        >>> bm = block_mask(2, 8, 1024, 1024, device='cuda', **tensors)",
        '    """',
        "    mask_mod = make_mods(q_offset=q_offset, kv_offset=kv_offset, **tensors)['mask_mod']",
        "    if mask_mod is None:",
        "        return None",
        "    return create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE)",
        "",
    ]
    out.append(_ALWAYS.rstrip("\n"))
    for name in _HELPERS:   # in a fixed order
        if name in helpers:
            out.append("")
            out.append(_HELPERS[name].rstrip("\n"))
    return "\n".join(out) + "\n"


def _and(parts: list[Node]) -> Node:
    node = parts[0]
    for p in parts[1:]:
        node = Binary("&", node, p)
    return node
