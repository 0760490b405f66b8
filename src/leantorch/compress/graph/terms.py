"""Terms: how the graph describes one tensor axis, and the union-find that merges them.

Each axis of each value in a traced model is a :data:`Term`:

- :class:`Atom`: an index space that cannot be cut further (the ``d`` channels of a conv
  output, the ``h`` heads of a projection);
- :class:`Product`: a reshape of several terms into one axis (``heads x head_dim``; the first
  factor is the outermost); ``ONE`` (the empty product) is an axis of size 1;
- :class:`Sum`: a concatenation of several terms along one axis (``cat([q, k, v])``).

:class:`Dims` owns the atoms: their sizes, the union-find that merges atoms found to be the
same index space (:meth:`Dims.unify`), the refinement of an atom into a product or a sum when
a reshape splits it or a slice takes part of it, and the facts recorded per merged atom (why it
may not be cut, why cutting it is not exact, tags such as ``"heads"`` that name its kind).
The op rules (:mod:`.rules`) state the facts through a :class:`Dims` held by the propagator
(:mod:`.propagation`), and the grouping (:mod:`.groups`) reads them back: every root atom a
parameter touches becomes one group, and :meth:`Dims.unit_map` says which unit each index of
a tensor's dimension belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

import torch

from leantorch.errors import LeanError

__all__ = ["ONE", "Atom", "Dims", "Product", "Sum", "Term", "concat", "factors", "is_term",
           "product"]

_MAX_REASONS = 4  # reasons kept per atom and table: enough to explain, short enough to print


@dataclass(frozen=True, slots=True)
class Atom:
    """An index space that cannot be cut further; ``index`` is its number in :class:`Dims`."""

    index: int


@dataclass(frozen=True, slots=True)
class Product:
    """An axis that is the reshape of ``factors`` (row-major: the first factor is outermost)."""

    factors: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class Sum:
    """An axis that is the concatenation of ``parts`` (in order)."""

    parts: tuple[Term, ...]


Term = Atom | Product | Sum
ONE: Term = Product(())  # an axis of size 1: nothing to cut


def is_term(value: object) -> bool:
    """Whether ``value`` is a term (the propagator's values are lists of terms, lists of such
    lists for ops with several outputs, or ``None``)."""
    return isinstance(value, Atom | Product | Sum)


def product(parts: Iterable[Term]) -> Term:
    """The product of ``parts``, nested products flattened; a single factor is itself."""
    flat: list[Term] = []
    for p in parts:
        if isinstance(p, Product):
            flat.extend(p.factors)
        else:
            flat.append(p)
    return flat[0] if len(flat) == 1 else Product(tuple(flat))


def concat(parts: Iterable[Term]) -> Term:
    """The concatenation of ``parts``, nested sums flattened; a single part is itself."""
    flat: list[Term] = []
    for p in parts:
        if isinstance(p, Sum):
            flat.extend(p.parts)
        else:
            flat.append(p)
    return flat[0] if len(flat) == 1 else Sum(tuple(flat))


def factors(term: Term) -> list[Term]:
    """The factors of a product; any other term is its own single factor."""
    return list(term.factors) if isinstance(term, Product) else [term]


def _children(term: Term) -> tuple[Term, ...]:
    match term:
        case Product(factors=items) | Sum(parts=items):
            return items
    return ()


class Dims:
    """Atoms (index spaces) with union-find, refinement of atoms into products or sums, and the
    reasons an atom may not be cut. Facts are kept on root atoms (merged when atoms merge)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.refined: dict[int, Term] = {}  # root atom -> the product or sum it was split into
        self.blocked: dict[int, list[str]] = {}
        self.inexact: dict[int, list[str]] = {}
        self.tags: dict[int, set[str]] = {}

    # ---- atoms
    def new(self, size: int, blocked: str | None = None) -> Term:
        """A fresh atom of ``size`` (``ONE`` for size 1), blocked for ``blocked`` if given."""
        if size == 1:
            return ONE
        if size < 1:
            raise LeanError(f"dependency graph: axis of size {size}")
        atom = len(self.parent)
        self.parent.append(atom)
        self.sizes.append(int(size))
        if blocked:
            self.blocked[atom] = [blocked]
        return Atom(atom)

    def find(self, atom: int) -> int:
        """The root of ``atom``'s union-find class (with path halving)."""
        parent = self.parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]
            atom = parent[atom]
        return atom

    def resolve(self, term: Term) -> Term:
        """``term`` in current form: atoms replaced by their roots, refined roots by what they
        were split into."""
        match term:
            case Atom(index):
                root = self.find(index)
                if root in self.refined:
                    return self.resolve(self.refined[root])
                return Atom(root)
            case Product(items):
                return product(self.resolve(t) for t in items)
            case Sum(items):
                return concat(self.resolve(t) for t in items)
        raise TypeError(f"not a term: {term!r}")

    def size(self, term: Term) -> int:
        """Length of the axis ``term`` describes: an atom's size, the product of a
        product's factors, the sum of a sum's parts."""
        match term:
            case Atom(index):
                return self.sizes[index]
            case Product(items):
                out = 1
                for t in items:
                    out *= self.size(t)
                return out
            case Sum(items):
                return sum(self.size(t) for t in items)
        raise TypeError(f"not a term: {term!r}")

    def atoms(self, term: Term) -> list[int]:
        """Root atoms of a term, in order (a root may repeat)."""
        term = self.resolve(term)
        if isinstance(term, Atom):
            return [term.index]
        return [a for t in _children(term) for a in self.atoms(t)]

    # ---- facts
    def block(self, term: Term, reason: str) -> None:
        """Mark the root atoms of ``term`` as not cuttable for ``reason`` (at most a
        few distinct reasons are kept per atom)."""
        for root in self.atoms(term):
            reasons = self.blocked.setdefault(root, [])
            if reason not in reasons and len(reasons) < _MAX_REASONS:
                reasons.append(reason)

    def mark_inexact(self, term: Term, reason: str) -> None:
        """Record ``reason`` on the root atoms of ``term``: cutting them changes the model's output
        beyond the removed units (kept, like block reasons, a few per atom)."""
        for root in self.atoms(term):
            reasons = self.inexact.setdefault(root, [])
            if reason not in reasons and len(reasons) < _MAX_REASONS:
                reasons.append(reason)

    def tag(self, term: Term, label: str) -> None:
        """Attach the label ``label`` to the root atoms of ``term`` (for example
        ``"broadcast"`` on repeated key heads)."""
        for root in self.atoms(term):
            self.tags.setdefault(root, set()).add(label)

    def _merge_facts(self, source: int, target: int) -> None:
        for table in (self.blocked, self.inexact):
            if source in table:
                reasons = table.setdefault(target, [])
                for r in table.pop(source):
                    if r not in reasons and len(reasons) < _MAX_REASONS:
                        reasons.append(r)
        if source in self.tags:
            self.tags.setdefault(target, set()).update(self.tags.pop(source))

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:  # the older atom stays root: groups come out in model order
            ra, rb = rb, ra
        self.parent[rb] = ra
        self._merge_facts(rb, ra)

    def _alias(self, atom: Atom, term: Term, why: str) -> None:
        """Refine ``atom`` (unrefined root) into the compound ``term`` everywhere."""
        root = self.find(atom.index)
        if root in self.atoms(term):
            self.block(Atom(root), f"{why}: an axis is reshaped into itself")
            return
        self.refined[root] = term
        for table in (self.blocked, self.inexact):
            for reason in table.pop(root, []):
                (self.block if table is self.blocked else self.mark_inexact)(term, reason)
        for label in self.tags.pop(root, set()):
            self.tag(term, label)

    def split_product(self, atom: Atom, outer: int) -> tuple[Term, Term]:
        """Refine ``atom`` (an unrefined root) into ``outer x (size // outer)``."""
        first, second = self.new(outer), self.new(self.sizes[atom.index] // outer)
        self._alias(atom, product((first, second)), "reshape")
        return first, second

    def split_sum(self, atom: Atom, first_size: int) -> tuple[Term, Term]:
        """Refine ``atom`` (an unrefined root) into ``first_size + (size - first_size)``."""
        first, second = self.new(first_size), self.new(self.sizes[atom.index] - first_size)
        self._alias(atom, concat((first, second)), "split")
        return first, second

    def split_outer(self, term: Term, outer: int, why: str) -> tuple[Term, Term]:
        """View ``term`` as ``outer x rest`` (refining atoms as needed)."""
        size = self.size(term)
        first, second = self.new(outer), self.new(size // outer)
        self.unify(term, product((first, second)), why)
        return self.resolve(first), self.resolve(second)

    def part(self, term: Term, start: int, end: int, why: str) -> Term:
        """The part ``[start, end)`` of ``term``, refining it into a sum of parts."""
        size = self.size(term)
        bounds = [0] + [b for b in (start, end) if 0 < b < size] + [size]
        pieces = [self.new(b - a) for a, b in pairwise(bounds)]
        self.unify(term, concat(pieces), why)
        return self.resolve(pieces[bounds.index(start)])

    # ---- unification
    def unify(self, left: Term, right: Term, why: str) -> None:
        """State that ``left`` and ``right`` are the same index space (``why`` is the op that
        says so). Sizes that disagree block both; compound terms are aligned factor by factor
        (or part by part), splitting atoms where one side is finer."""
        a, b = self.resolve(left), self.resolve(right)
        if a == b:
            return
        size_a, size_b = self.size(a), self.size(b)
        if size_a != size_b:
            self.block(a, f"{why}: sizes {size_a} and {size_b} disagree")
            self.block(b, f"{why}: sizes {size_a} and {size_b} disagree")
            return
        if size_a == 1:
            return
        match a, b:
            case Atom(), Atom():
                self._union(a.index, b.index)
            case Atom(), _:
                self._alias(a, b, why)
            case _, Atom():
                self._alias(b, a, why)
            case Sum(), Sum():
                self._walk(list(a.parts), list(b.parts), why, additive=True)
            case _:
                self._walk(factors(a), factors(b), why, additive=False)

    def _walk(self, left: list[Term], right: list[Term], why: str, additive: bool) -> None:
        """Align two factor lists (products) or part lists (sums) on their common refinement."""
        i = j = 0
        while i < len(left) and j < len(right):
            x, y = self.resolve(left[i]), self.resolve(right[j])
            sx, sy = self.size(x), self.size(y)
            if sx == sy:
                self.unify(x, y, why)
                i, j = i + 1, j + 1
                continue
            _small, big, big_list, big_index = (x, y, right, j) if sx < sy else (y, x, left, i)
            s_small, s_big = min(sx, sy), max(sx, sy)
            fits = (s_big - s_small > 0) if additive else (s_big % s_small == 0)
            if not isinstance(big, Atom) or not fits:
                self._fail(left, right, why)
                return
            pieces = self.split_sum(big, s_small) if additive else \
                self.split_product(big, s_small)
            big_list[big_index:big_index + 1] = list(pieces)
        if i != len(left) or j != len(right):
            self._fail(left, right, why)

    def _fail(self, left: list[Term], right: list[Term], why: str) -> None:
        reason = f"{why}: the dimensions are mixed (not a reshape of whole index spaces)"
        for term in (*left, *right):
            self.block(term, reason)

    # ---- units (read by the grouping)
    def repeats_in_product(self, term: Term, root: int) -> bool:
        """Whether ``root`` occurs in two factors of one product (a unit would then be
        ambiguous); occurring in several parts of a concatenation is fine."""
        term = self.resolve(term)
        match term:
            case Atom():
                return False
            case Sum(items):
                return any(self.repeats_in_product(t, root) for t in items)
            case Product(items):
                holders = [t for t in items if root in self.atoms(t)]
                return len(holders) > 1 or any(self.repeats_in_product(t, root) for t in holders)
        raise TypeError(f"not a term: {term!r}")

    def unit_map(self, term: Term, root: int) -> torch.Tensor:
        """For each flat index of ``term``, the unit of atom ``root`` it belongs to (-1: none).
        Shape ``(size(term),)``, dtype long."""
        term = self.resolve(term)
        size = self.size(term)
        match term:
            case Atom(index):
                if index == root:
                    return torch.arange(size)
                return torch.full((size,), -1, dtype=torch.long)
            case Sum(items):
                return torch.cat([self.unit_map(t, root) for t in items])
            case Product(items):
                sizes = [self.size(t) for t in items]
                out = torch.full((size,), -1, dtype=torch.long)
                for i, factor in enumerate(items):
                    if root not in self.atoms(factor):
                        continue
                    local = self.unit_map(factor, root)
                    shape = [1] * len(sizes)
                    shape[i] = sizes[i]
                    out = local.view(shape).expand(sizes).reshape(-1).clone()
                return out
        raise TypeError(f"not a term: {term!r}")
