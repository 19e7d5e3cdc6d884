"""The course's own results as evidence: what the capstone notebook (09) reads and weighs.

Every notebook prints its key numbers in a summary cell (``# NBVAL_CHECK_OUTPUT``, lines
``key: value``) and is committed with its default-profile outputs. :func:`read_course_record`
reads them back from the notebook files with :func:`fedlora_lite.course.site.summary_rows` (the
parser of the HTML course), so the capstone needs no ``outputs/`` folder. A value that is not
there (a renamed key, a notebook not executed) raises :class:`MissingEvidence` naming the
notebook and the key, and a :class:`ClaimLedger` records that item as *missing* instead of
failing. A ledger holds claims and, for each, evidence items: small functions of the record
returning ``(supports, sentence)``, so which side an item falls on is computed from the numbers
(a re-run of an earlier notebook can move it) and its sentence states them. :class:`Comparison`
records CLAIR against the best other method of one experiment.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from .notebooks import default_notebooks_dir, discover_notebooks
from .site import summary_rows

__all__ = ["MissingEvidence", "CourseRecord", "read_course_record", "parse_summary_value", "relation",
           "EvidenceItem", "Comparison", "ClaimLedger", "LIVE"]

LIVE = "live"  # the source name of evidence computed in the capstone itself
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


class MissingEvidence(LookupError):
    """A value an evidence item needs is not in the committed notebooks (message says which)."""


def parse_summary_value(text: str) -> Any:
    """A printed summary value as Python data: ``"0.5"`` -> 0.5, ``"{'a': 1}"`` -> dict, else the text."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text.strip()  # a bare word ("default") or a repr that is not a literal


def _stdout_lines(nb: nbformat.NotebookNode) -> list[str]:
    return [line for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stdout"
            for line in o.get("text", "").splitlines()]


@dataclass
class CourseRecord:
    """The printed results of the course's executed notebooks, by notebook number ("05").

    Attributes:
        notebooks_dir: where the notebooks were read from.
        names: number -> notebook name (``"05"`` -> ``"05_transformer_copy"``).
        summaries: number -> {key: parsed value} from the summary cell(s).
        lines: number -> every stdout line of the notebook's code cells (for tables that a
            summary cell does not repeat).
        problems: number -> why a notebook gave no summary (unreadable, not executed).
    """

    notebooks_dir: Path
    names: dict[str, str] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines: dict[str, list[str]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def _summary(self, notebook: str) -> dict[str, Any]:
        number = _number(notebook)
        if number in self.problems:
            raise MissingEvidence(f"notebook {number}: {self.problems[number]}")
        if number not in self.summaries:
            raise MissingEvidence(f"notebook {number} is not in {self.notebooks_dir}")
        return self.summaries[number]

    def value(self, notebook: str | int, key: str, *path: Any) -> Any:
        """The value printed for ``key`` by ``notebook``'s summary, then indexed by ``path``.

        ``value("05", "homogeneous_clair")``; ``value("06", "copy_worst_accuracy", "clair", "0.4")``.

        Raises:
            MissingEvidence: the notebook, the key or a step of ``path`` is not there.
        """
        summary = self._summary(str(notebook))
        if key not in summary:
            raise MissingEvidence(f"notebook {_number(str(notebook))} prints no summary key {key!r}")
        value = summary[key]
        for step in path:
            try:
                value = value[step]
            except (KeyError, IndexError, TypeError):
                raise MissingEvidence(f"notebook {_number(str(notebook))}: {key!r} has no entry {step!r}") from None
        return value

    def number(self, notebook: str | int, key: str, *path: Any) -> int | float:
        """:meth:`value`, checked to be a number (an int or float as printed; a bool is not a measurement)."""
        value = self.value(notebook, key, *path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MissingEvidence(f"notebook {_number(str(notebook))}: {key!r}{list(path) or ''} is {value!r}, "
                                  "not a number")
        return value

    def keys(self, notebook: str | int) -> list[str]:
        """The summary keys ``notebook`` prints, in order (raises :class:`MissingEvidence` if none)."""
        return list(self._summary(str(notebook)))

    def find_key(self, notebook: str | int, prefix: str) -> str:
        """The first summary key of ``notebook`` that starts with ``prefix`` (keys may carry their
        conditions: ``"success_low_corner (r0<=2, frac<=0.4)"``).

        Raises:
            MissingEvidence: no such key.
        """
        for key in self._summary(str(notebook)):
            if key.startswith(prefix):
                return key
        raise MissingEvidence(f"notebook {_number(str(notebook))} prints no summary key starting with {prefix!r}")

    def numbers_in_line(self, notebook: str | int, prefix: str) -> list[float]:
        """The numbers on the first printed line of ``notebook`` that starts with ``prefix``.

        For a table a notebook prints but does not repeat in its summary, e.g. one row of a
        sweep: ``numbers_in_line("05", "fedavg ")``.

        Raises:
            MissingEvidence: no such line (or no number on it).
        """
        number = _number(str(notebook))
        self._summary(number)  # same errors for an absent notebook
        for line in self.lines.get(number, []):
            if line.lstrip().startswith(prefix):
                found = [float(x) for x in _NUMBER.findall(line.lstrip()[len(prefix):])]
                if found:
                    return found
        raise MissingEvidence(f"notebook {number} prints no line starting with {prefix!r}")


def _number(notebook: str) -> str:
    text = str(notebook)
    head = text.split("_", 1)[0]
    if not head.isdigit():
        raise ValueError(f"notebook must be a number like '05' or a name like '05_transformer_copy', got {notebook!r}")
    return f"{int(head):02d}"


def read_course_record(notebooks_dir: str | Path | None = None, only: Sequence[str | int] | None = None,
                       exclude: Sequence[str | int] = ()) -> CourseRecord:
    """Read the summary cells (and printed lines) of the executed notebooks in ``notebooks_dir``.

    Args:
        notebooks_dir: a folder of executed ``NN_topic.ipynb`` files; default the checkout's
            ``notebooks/`` (committed with their default-profile outputs).
        only: restrict to these notebooks (numbers or names).
        exclude: leave these out (numbers or names), e.g. the notebook doing the reading, so
            that its own earlier outputs never become its evidence.

    Returns:
        A :class:`CourseRecord`; a notebook that cannot be read or has no printed summary is
        listed in ``problems`` rather than raising.
    """
    root = default_notebooks_dir() if notebooks_dir is None else Path(notebooks_dir)
    record = CourseRecord(notebooks_dir=root)
    if isinstance(exclude, (str, int)):
        exclude = [exclude]
    skip = {_number(str(x)) for x in exclude}
    for info in discover_notebooks(root, only):
        if info.number in skip:
            continue
        record.names[info.number] = info.name
        try:
            nb = nbformat.read(info.path, as_version=4)
        except Exception as exc:  # noqa: BLE001 - a broken file is reported as missing evidence, not a crash
            record.problems[info.number] = f"{info.path.name} cannot be read ({type(exc).__name__}: {exc})"
            continue
        rows = summary_rows(nb)
        if not rows:
            record.problems[info.number] = f"{info.path.name} has no executed summary cell (run fedlora-lite refresh)"
            continue
        record.summaries[info.number] = {key: parse_summary_value(value) for key, value in rows}
        record.lines[info.number] = _stdout_lines(nb)
    return record


def relation(a: float, b: float, tol: float = 0.0005, *, words: tuple[str, str, str] = ("above", "below", "level with")) -> str:
    """``"above"`` if a > b + tol, ``"below"`` if a < b - tol, else ``"level with"`` (custom ``words``).

    The difference is rounded to 9 decimals first, so printed values (0.886 vs 0.891, tol 0.005)
    sit exactly on the tolerance instead of on either side of it by a rounding error.
    """
    diff = round(float(a) - float(b), 9)
    return words[0] if diff > tol else words[1] if diff < -tol else words[2]


@dataclass(frozen=True)
class EvidenceItem:
    """One piece of evidence on one claim.

    Attributes:
        claim: the claim's id.
        name: the evidence function's name (what the item checks).
        supports: True = evidence for the claim, False = against it (or a limit of it),
            None = missing.
        text: the sentence, with the numbers it read (None when missing).
        sources: notebook numbers it read ("05"), or ``"live"`` for a computation of the capstone.
        missing: why it could not be evaluated (None when found).
    """

    claim: str
    name: str
    supports: bool | None
    text: str | None
    sources: tuple[str, ...]
    missing: str | None = None

    @property
    def found(self) -> bool:
        return self.missing is None


@dataclass(frozen=True)
class Comparison:
    """CLAIR against the other methods on one experiment (one metric).

    Attributes:
        label: what was compared ("05 heterogeneous").
        clair: CLAIR's value.
        others: the other methods' values (oracles excluded by the caller).
        higher_is_better: True for accuracies, False for errors.
        sources: notebook numbers the values come from.
    """

    label: str
    clair: float
    others: Mapping[str, float]
    higher_is_better: bool = True
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.others:
            raise ValueError(f"{self.label}: others must name at least one method")

    @property
    def best_other(self) -> tuple[str, float]:
        """The strongest other method and its value."""
        pick = max if self.higher_is_better else min
        name = pick(self.others, key=self.others.get)
        return name, float(self.others[name])

    @property
    def margin(self) -> float:
        """CLAIR minus the best other method, signed so that positive means CLAIR is better."""
        best = self.best_other[1]
        return self.clair - best if self.higher_is_better else best - self.clair

    def outcome(self, tol: float = 0.0) -> str:
        """``"wins"``, ``"loses"`` or ``"ties"`` (margin within ``tol``) for CLAIR, as :func:`relation` rounds."""
        return relation(self.margin, 0.0, tol, words=("wins", "loses", "ties"))


class _Reader:
    """What an evidence function reads through: the record's lookups, remembering the sources.

    ``v(nb, key, *path)`` is :meth:`CourseRecord.number`; ``v.value``, ``v.number``,
    ``v.numbers_in_line``, ``v.find_key`` and ``v.keys`` are the record's methods.
    """

    _METHODS = ("value", "number", "numbers_in_line", "find_key", "keys")

    def __init__(self, record: CourseRecord) -> None:
        self._record = record
        self.sources: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in self._METHODS:
            raise AttributeError(f"an evidence reader has no {name!r}; it offers {list(self._METHODS)}")
        method = getattr(self._record, name)

        def read(notebook: str | int, *args: Any) -> Any:
            number = _number(str(notebook))
            if number not in self.sources:
                self.sources.append(number)
            return method(notebook, *args)

        return read

    def __call__(self, notebook: str | int, key: str, *path: Any) -> float:
        return self.number(notebook, key, *path)


class ClaimLedger:
    """Claims, the evidence for and against each, and comparisons, read from a :class:`CourseRecord`.

    Register evidence with the decorator :meth:`evidence`; the decorated function receives a
    reader ``v`` (``v("05", "homogeneous_clair")`` is a number, ``v.value(...)`` any value,
    ``v.numbers_in_line(...)`` a printed row) and returns ``(supports, sentence)``. It runs
    at once; a :class:`MissingEvidence` it raises is recorded, never propagated.

    Args:
        record: the course's printed results.
        claims: claim id -> the claim's statement, in display order.
    """

    def __init__(self, record: CourseRecord, claims: Mapping[str, str]) -> None:
        if not isinstance(record, CourseRecord):
            raise TypeError(f"record must be a CourseRecord, got {type(record).__name__}")
        if not claims:
            raise ValueError("claims must name at least one claim")
        self.record = record
        self.claims = dict(claims)
        self.items: list[EvidenceItem] = []
        self.comparisons: list[Comparison] = []
        self.missing_comparisons: dict[str, str] = {}

    def evidence(self, claim: str, *, live: bool = False,
                 name: str | None = None) -> Callable[[Callable[..., tuple[bool, str]]], EvidenceItem]:
        """Decorator: evaluate ``fn(v) -> (supports, sentence)`` now and record the item on ``claim``.

        ``live=True`` marks evidence computed in the notebook itself (its source is ``"live"``);
        ``name`` replaces the function's name as the item's name. The decorated name is bound
        to the resulting :class:`EvidenceItem`.
        """
        if claim not in self.claims:
            raise ValueError(f"claim must be one of {list(self.claims)}, got {claim!r}")

        def register(fn: Callable[..., tuple[bool, str]]) -> EvidenceItem:
            reader = _Reader(self.record)
            label = name or fn.__name__
            try:
                supports, text = fn(reader)
            except MissingEvidence as exc:
                item = EvidenceItem(claim, label, None, None, tuple(reader.sources), missing=str(exc))
            else:
                if not isinstance(text, str):
                    raise TypeError(f"{label} must return (supports, sentence), got {type(text).__name__}")
                sources = tuple(reader.sources) + ((LIVE,) if live else ())
                item = EvidenceItem(claim, label, bool(supports), text, sources)
            self.items.append(item)
            return item

        return register

    def comparison(self, fn: Callable[..., Comparison]) -> Comparison | None:
        """Decorator: evaluate ``fn(v) -> Comparison`` now and record it (or why it is missing)."""
        reader = _Reader(self.record)
        try:
            result = fn(reader)
        except MissingEvidence as exc:
            self.missing_comparisons[fn.__name__] = str(exc)
            return None
        if not isinstance(result, Comparison):
            raise TypeError(f"{fn.__name__} must return a Comparison, got {type(result).__name__}")
        if not result.sources:
            result = Comparison(result.label, result.clair, dict(result.others), result.higher_is_better,
                                tuple(reader.sources))
        self.comparisons.append(result)
        return result

    def select(self, claim: str | None = None, supports: bool | None = None) -> list[EvidenceItem]:
        """Found items, optionally of one claim and one side (True = for, False = against)."""
        return [i for i in self.items if i.found and (claim is None or i.claim == claim)
                and (supports is None or i.supports is supports)]

    def missing(self) -> list[EvidenceItem]:
        """Items that could not be evaluated, each with its reason."""
        return [i for i in self.items if not i.found]

    def counts(self) -> dict[str, dict[str, int]]:
        """Claim id -> {"for", "against", "missing"} numbers of items."""
        out = {c: {"for": 0, "against": 0, "missing": 0} for c in self.claims}
        for item in self.items:
            out[item.claim]["missing" if not item.found else "for" if item.supports else "against"] += 1
        return out

    def matrix(self, sources: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Counts of found items for and against, as ``[claim][source]`` lists (claims in order)."""
        index = {s: j for j, s in enumerate(sources)}
        pro = [[0] * len(sources) for _ in self.claims]
        con = [[0] * len(sources) for _ in self.claims]
        rows = {c: i for i, c in enumerate(self.claims)}
        for item in self.select():
            for s in item.sources:
                if s in index:
                    (pro if item.supports else con)[rows[item.claim]][index[s]] += 1
        return pro, con

    def label(self, claim: str) -> str:
        """A verdict label from the claim's found items: "supported" (nothing against), "supported,
        with limits" (both), "not supported here" (nothing for), "not assessable" (nothing found)."""
        n = self.counts()[claim]
        if n["for"] + n["against"] == 0:
            return "not assessable (its evidence is missing)"
        if n["against"] == 0:
            return "supported"
        return "supported, with limits" if n["for"] else "not supported by this course's evidence"

    def markdown(self, claim: str, verdict: str | None = None) -> str:
        """The claim, its evidence for and against (each with its sources), missing items, a verdict."""
        if claim not in self.claims:
            raise ValueError(f"claim must be one of {list(self.claims)}, got {claim!r}")

        def bullet(item: EvidenceItem) -> str:
            where = ", ".join(s if s == LIVE else f"nb {s}" for s in item.sources)
            return f"- [{where}] {item.text}"

        parts = [f"**Claim.** {self.claims[claim]}", "", "**Evidence for**"]
        parts += [bullet(i) for i in self.select(claim, True)] or ["- (none found)"]
        parts += ["", "**Evidence against, or limits**"]
        parts += [bullet(i) for i in self.select(claim, False)] or ["- (none found)"]
        missing = [i for i in self.missing() if i.claim == claim]
        if missing:
            parts += ["", "**Not found** (an earlier notebook changed or is not executed)"]
            parts += [f"- `{i.name}`: {i.missing}" for i in missing]
        if verdict:
            n = self.counts()[claim]
            parts += ["", f"**Verdict: {self.label(claim)}** ({n['for']} for, {n['against']} against). {verdict}"]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain data (for ``save_results``)."""
        return {
            "claims": dict(self.claims),
            "counts": self.counts(),
            "items": [{"claim": i.claim, "name": i.name, "supports": i.supports, "text": i.text,
                       "sources": list(i.sources), "missing": i.missing} for i in self.items],
            "comparisons": [{"label": c.label, "clair": c.clair, "best_other": c.best_other[0],
                             "best_other_value": c.best_other[1], "margin": c.margin,
                             "higher_is_better": c.higher_is_better, "sources": list(c.sources)}
                            for c in self.comparisons],
            "missing_comparisons": dict(self.missing_comparisons),
        }
