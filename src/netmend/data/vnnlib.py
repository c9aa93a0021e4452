"""VNN-LIB properties: an input box (or a union of boxes) and the UNSAFE output region.

The unsafe region is a disjunction of conjunctions of linear inequalities `C y + d ≤ 0`
(VNN-LIB encodes the negation of "must hold"; ties count as unsafe). `violated(y)` and the
differentiable `margin(y)` (≥ 0 iff violated) batch over any leading dimensions of y (..., K).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NetmendError, first_line

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VAR = re.compile(r"^([XY])_(\d+)$")

# Stated limits: what a property file may ask for before parsing it would exhaust the stack or the memory.
MAX_NESTING = 100             # parentheses open at once (ACAS Xu and VNN-COMP files use fewer than 10)
MAX_DISJUNCTS = 10_000        # input boxes or unsafe conjunctions after expanding and / or
MAX_VARIABLES = 1_000_000     # X_i or Y_j declared (indices 0..MAX_VARIABLES-1)
MAX_TABLE_VALUES = 50_000_000  # boxes × inputs, or unsafe conjunctions × outputs


@dataclass
class Property:
    """boxes: [(lo, hi)] in normalised input units; unsafe: [(C (m×K), d (m))], unsafe iff any(all(C y + d ≤ 0))."""

    name: str
    boxes: list[tuple[torch.Tensor, torch.Tensor]]
    unsafe: list[tuple[torch.Tensor, torch.Tensor]]
    n_inputs: int
    n_outputs: int
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.boxes:
            raise NetmendError(f"property {self.name}: no input box")
        for lo, hi in self.boxes:
            bad = (lo > hi).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise NetmendError(f"property {self.name} has an empty input box: X_{i} in [{float(lo[i])}, {float(hi[i])}]")
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                i = int((~(torch.isfinite(lo) & torch.isfinite(hi))).nonzero()[0])
                raise NetmendError(f"property {self.name}: input X_{i} has no lower or upper bound")
        if not self.unsafe:
            raise NetmendError(f"property {self.name}: no output constraint")

    def _rows(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Per disjunct, the largest constraint value max_r (C y + d)_r; the disjunct holds iff it is ≤ 0."""
        if y.shape[-1] != self.n_outputs:
            raise NetmendError(f"property {self.name} speaks of {self.n_outputs} outputs, the network gives {y.shape[-1]}")
        out = []
        for c, d in self.unsafe:
            c, d = c.to(y.device, y.dtype), d.to(y.device, y.dtype)
            out.append((y @ c.T + d).amax(-1))
        return out

    def margin(self, y: torch.Tensor) -> torch.Tensor:
        """Differentiable violation margin (..., K) -> (...): ≥ 0 iff the output lies in the unsafe region."""
        return -torch.stack(self._rows(y), -1).amin(-1)

    def violated(self, y: torch.Tensor) -> torch.Tensor:
        """bool (...): the output violates the property (ties count as unsafe)."""
        return torch.stack([r <= 0 for r in self._rows(y)], -1).any(-1)

    def in_box(self, x: torch.Tensor) -> torch.Tensor:
        """bool (...): x lies in one of the input boxes."""
        inside = [((x >= lo.to(x)) & (x <= hi.to(x))).all(-1) for lo, hi in self.boxes]
        return torch.stack(inside, -1).any(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n points uniformly from the union of boxes (boxes picked by volume; zero-width sides count as 1)."""
        lo = torch.stack([b[0] for b in self.boxes])
        hi = torch.stack([b[1] for b in self.boxes])
        width = hi - lo
        vol = torch.where(width > 0, width, torch.ones_like(width)).prod(-1).double()
        pick = torch.multinomial(vol / vol.sum(), n, replacement=True, generator=generator) if len(vol) > 1 \
            else torch.zeros(n, dtype=torch.long)
        u = torch.rand(n, self.n_inputs, generator=generator)
        return lo[pick] + u * width[pick]

    def clamp(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """Project x (N, n_in) onto box `which[i]` (default: the first box)."""
        lo = torch.stack([b[0] for b in self.boxes]).to(x)
        hi = torch.stack([b[1] for b in self.boxes]).to(x)
        idx = which if which is not None else torch.zeros(len(x), dtype=torch.long, device=x.device)
        return torch.maximum(torch.minimum(x, hi[idx]), lo[idx])

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "boxes": [[lo.tolist(), hi.tolist()] for lo, hi in self.boxes],
                "unsafe_disjuncts": len(self.unsafe), **self.meta}


# ---------------------------------------------------------------- parsing

def _parse_sexprs(text: str, where: str) -> list:
    text = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    stack: list[list] = [[]]
    for tok in _TOKEN.findall(text):
        if tok == "(":
            stack.append([])
            if len(stack) - 1 > MAX_NESTING:
                raise NetmendError(f"{where}: expressions nested more than {MAX_NESTING} deep (netmend's limit)")
        elif tok == ")":
            if len(stack) == 1:
                raise NetmendError(f"{where}: unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise NetmendError(f"{where}: unbalanced '(' ({len(stack) - 1} left open)")
    return stack[0]


def _linear(expr, n: dict[str, int], where: str) -> tuple[dict[tuple[str, int], float], float]:
    """A term as ({(X|Y, index): coeff}, constant)."""
    if isinstance(expr, str):
        m = _VAR.match(expr)
        if m:
            if m.group(1) == "X" and int(m.group(2)) >= n["X"] or m.group(1) == "Y" and int(m.group(2)) >= n["Y"]:
                raise NetmendError(f"{where}: {expr} is used but not declared")
            return {(m.group(1), int(m.group(2))): 1.0}, 0.0
        try:
            return {}, float(expr)
        except ValueError:
            raise NetmendError(f"{where}: unknown term {expr!r}") from None
    if not expr:
        raise NetmendError(f"{where}: empty expression ()")
    op, args = expr[0], [_linear(a, n, where) for a in expr[1:]]
    if op == "+" or (op == "-" and len(args) > 1):
        coef, const = dict(args[0][0]), args[0][1]
        sign = 1.0 if op == "+" else -1.0
        for cf, ct in args[1:]:
            for k, v in cf.items():
                coef[k] = coef.get(k, 0.0) + sign * v
            const += sign * ct
        return coef, const
    if op == "-" and len(args) == 1:
        return {k: -v for k, v in args[0][0].items()}, -args[0][1]
    if op == "*" and len(args) == 2:
        (ca, ka), (cb, kb) = args
        if ca and cb:
            raise NetmendError(f"{where}: product of two variables is not linear")
        if ca:
            return {k: v * kb for k, v in ca.items()}, ka * kb
        return {k: v * ka for k, v in cb.items()}, ka * kb
    raise NetmendError(f"{where}: unsupported operator {op!r}")


def _atoms(expr, n, where) -> list[list[tuple[dict, float]]]:
    """A boolean expression as DNF: a list of conjunctions, each a list of (coef, const) meaning coef·v + const ≤ 0."""
    if not isinstance(expr, list) or not expr:
        raise NetmendError(f"{where}: expected a constraint, got {expr!r}")
    op = expr[0]
    if op in ("<=", ">=", "<", ">"):
        if len(expr) != 3:
            raise NetmendError(f"{where}: ({op} ...) needs two operands")
        (ca, ka), (cb, kb) = _linear(expr[1], n, where), _linear(expr[2], n, where)
        if op in (">=", ">"):
            (ca, ka), (cb, kb) = (cb, kb), (ca, ka)
        coef = dict(ca)
        for k, v in cb.items():
            coef[k] = coef.get(k, 0.0) - v
        return [[(coef, ka - kb)]]
    if op == "and":
        dnf: list[list] = [[]]
        for sub in expr[1:]:
            dnf = _product(dnf, _atoms(sub, n, where), where)
        return dnf
    if op == "or":
        out = [c for sub in expr[1:] for c in _atoms(sub, n, where)]
        _check_disjuncts(len(out), where)
        return out
    raise NetmendError(f"{where}: unsupported connective {op!r}")


def _check_disjuncts(count: int, where: str) -> None:
    if count > MAX_DISJUNCTS:
        raise NetmendError(f"{where}: the constraints expand to {count:,} or more alternatives (and over or); "
                           f"netmend's limit is {MAX_DISJUNCTS:,}")


def _product(a: list[list], b: list[list], where: str) -> list[list]:
    """Conjunction of two DNFs (every pair of their conjunctions), refused before it grows past the limit."""
    _check_disjuncts(len(a) * len(b), where)
    return [x + y for x in a for y in b]


def _box_from(conj: list[tuple[dict, float]], n_x: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.full((n_x,), float("-inf"), dtype=torch.float64)
    hi = torch.full((n_x,), float("inf"), dtype=torch.float64)
    for coef, const in conj:
        if len(coef) != 1:
            raise NetmendError(f"{where}: input constraints must bound one variable each (a box)")
        ((_, i), a), = coef.items()
        if a == 0:
            continue
        bound = -const / a      # a·x + const ≤ 0
        if a > 0:
            hi[i] = min(hi[i], bound)
        else:
            lo[i] = max(lo[i], bound)
    return lo.float(), hi.float()


def parse_vnnlib(text: str, name: str = "property", source: str = "") -> Property:
    """Parse VNN-LIB text: declare-const X_i / Y_j, asserts over inputs (boxes) and outputs (unsafe DNF)."""
    where = source or name
    exprs = _parse_sexprs(text, where)
    n = {"X": 0, "Y": 0}
    x_dnf: list[list] = [[]]
    y_dnf: list[list] = [[]]
    for e in exprs:
        if not isinstance(e, list) or not e:
            raise NetmendError(f"{where}: stray token {e!r} at top level")
        if e[0] == "declare-const":
            m = _VAR.match(e[1]) if len(e) == 3 and isinstance(e[1], str) else None
            if not m:
                raise NetmendError(f"{where}: bad declaration {e!r} (expected (declare-const X_i Real) or Y_j)")
            if int(m.group(2)) >= MAX_VARIABLES:
                raise NetmendError(f"{where}: {e[1]} is beyond netmend's limit of {MAX_VARIABLES:,} "
                                   f"{'inputs' if m.group(1) == 'X' else 'outputs'}")
            n[m.group(1)] = max(n[m.group(1)], int(m.group(2)) + 1)
        elif e[0] == "assert":
            if len(e) != 2:
                raise NetmendError(f"{where}: (assert ...) takes one constraint")
            dnf = _atoms(e[1], n, where)
            kinds = {k[0] for conj in dnf for coef, _ in conj for k in coef}
            if kinds == {"X"}:
                x_dnf = _product(x_dnf, dnf, where)
            elif kinds == {"Y"}:
                y_dnf = _product(y_dnf, dnf, where)
            else:
                raise NetmendError(f"{where}: an assertion mixes inputs and outputs (not supported)")
        else:
            raise NetmendError(f"{where}: unsupported command {e[0]!r}")
    if n["X"] == 0 or n["Y"] == 0:
        raise NetmendError(f"{where}: declares no inputs X_i or no outputs Y_j")
    if y_dnf == [[]]:
        raise NetmendError(f"{where}: no output constraint")
    for count, size, what in ((len(x_dnf), n["X"], "input boxes × inputs"), (len(y_dnf), n["Y"], "unsafe regions × outputs")):
        if count * size > MAX_TABLE_VALUES:
            raise NetmendError(f"{where}: {count:,} {what.split(' × ')[0]} over {size:,} variables is more than "
                               f"netmend's limit of {MAX_TABLE_VALUES:,} values ({what})")
    boxes = [_box_from(conj, n["X"], where) for conj in x_dnf]
    unsafe = []
    for conj in y_dnf:
        c = torch.zeros(len(conj), n["Y"])
        d = torch.zeros(len(conj))
        for r, (coef, const) in enumerate(conj):
            for (_, j), v in coef.items():
                c[r, j] = v
            d[r] = const
        unsafe.append((c, d))
    return Property(name, boxes, unsafe, n["X"], n["Y"], source)


def load_vnnlib(path: str | Path) -> Property:
    """A .vnnlib file as a Property (its name is the file stem, e.g. prop_8)."""
    path = Path(path)
    if not path.is_file():
        raise NetmendError(f"property file not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise NetmendError(f"{path}: not a text .vnnlib file") from None
    return parse_vnnlib(text, path.stem, str(path))


def check_network(prop: Property, model, in_shape=None) -> None:
    """The network reads the property's inputs and gives its outputs: a one-line error naming both counts
    otherwise (a property naming 7 inputs for a 5-input network is the user's mistake, not a shape error)."""
    if in_shape is not None:
        n_in = 1
        for s in in_shape:
            n_in *= int(s)
        if n_in != prop.n_inputs:
            raise NetmendError(f"property {prop.name} speaks of {prop.n_inputs} inputs (X_0..X_{prop.n_inputs - 1}); "
                               f"the network takes {n_in}")
    try:
        p = next(iter(model.parameters()), None)
        with torch.no_grad():
            y = model(torch.zeros(1, prop.n_inputs, dtype=p.dtype if p is not None and p.is_floating_point()
                                  else torch.float32, device=p.device if p is not None else "cpu"))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise NetmendError(f"property {prop.name} speaks of {prop.n_inputs} inputs (X_0..X_{prop.n_inputs - 1}); the "
                           f"network does not take that many ({first_line(exc, 120)})") from None
    if y.shape[-1] != prop.n_outputs:
        raise NetmendError(f"property {prop.name} has {prop.n_outputs} outputs, the network {y.shape[-1]}")


def argmin_property(name: str, boxes: list[tuple[list[float], list[float]]], allowed: list[int], n_outputs: int = 5) -> Property:
    """Property "the argmin lies in `allowed`": unsafe iff some other output j is ≤ every allowed output."""
    unsafe = []
    for j in range(n_outputs):
        if j in allowed:
            continue
        c = torch.zeros(len(allowed), n_outputs)
        for r, a in enumerate(allowed):
            c[r, j], c[r, a] = 1.0, -1.0      # y_j − y_a ≤ 0
        unsafe.append((c, torch.zeros(len(allowed))))
    bx = [(torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)) for lo, hi in boxes]
    return Property(name, bx, unsafe, len(boxes[0][0]), n_outputs, "built-in")
