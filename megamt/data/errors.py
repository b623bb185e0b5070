"""Bad input: one error type that names where, and a per-reason skip counter.

Every reader and stage takes ``on_error`` ("raise" | "skip") and a :class:`SkipCounter`.
With "raise" the first problem raises :class:`DataError` naming the file and line (or the
sample key) and what to do; with "skip" the example is dropped and counted under its
reason, and the counts are written to ``manifest.json``. Nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter

# Reasons used across the data path (the keys of ``manifest.json``'s ``skips``).
REASONS = (
    "malformed_row",        # TSV/CSV row that cannot be split into the header's columns
    "malformed_json",       # JSON line / JSON file that does not parse
    "missing_field",        # a mapped field is absent
    "extra_field",          # more columns than the header names
    "empty_field",          # a required text field is empty
    "unknown_label",        # label (or NER tag type) outside the task's label set
    "answer_mismatch",      # QA answer text not found at its answer_start in the context
    "bad_columns",          # CoNLL line with the wrong number of columns
    "bad_tag",              # CoNLL tag that is not O / B-X / I-X
    "missing_column",       # a CoNLL tag column (inputs.*.tag_column) the file does not have
    "too_few_choices",      # a multiple-choice example with fewer than 2 choices (or an empty one)
    "label_out_of_range",   # a multiple-choice label that names no choice
    "empty_input",          # a file (or split) without any example
    "overlong",             # longer than data.seq_len with data.overlong=reject
    "truncated",            # longer than data.seq_len, truncated (counted, not dropped)
)


class DataError(ValueError):
    """Bad input. The message names the file and line / sample key and says what to do."""

    def __init__(self, where: str, reason: str, message: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {message} [{reason}]")


class SkipCounter:
    """Counts skipped (or truncated) examples per reason; keeps a few examples of each."""

    def __init__(self, keep: int = 3):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.keep = keep

    def add(self, reason: str, where: str = "", message: str = "") -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.keep and where:
            shown.append(f"{where}: {message}" if message else where)

    def update(self, other: "SkipCounter | dict") -> None:
        counts = other.counts if isinstance(other, SkipCounter) else other
        self.counts.update(dict(counts))
        if isinstance(other, SkipCounter):
            for r, ex in other.examples.items():
                mine = self.examples.setdefault(r, [])
                mine.extend(ex[: max(0, self.keep - len(mine))])

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return {k: self.counts[k] for k in sorted(self.counts)}

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def bad_input(on_error: str, skips: SkipCounter | None, where: str, reason: str, message: str) -> None:
    """Raise (``on_error="raise"``) or count a skip. The caller drops the example after this."""
    if on_error == "skip":
        if skips is not None:
            skips.add(reason, where, message)
        return
    if on_error != "raise":
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    raise DataError(where, reason, message + " (fix the input, or pass --on-error skip / data.on_error=skip "
                                             "to skip and count such rows)")
