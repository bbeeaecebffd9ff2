"""Problems found in a source folder: each one fixed or skipped, never silent, listed in ``problems.csv``."""

from __future__ import annotations

from dataclasses import dataclass

PROBLEM_COLUMNS = ("file", "image_id", "kind", "action", "detail")


# Every kind of problem prepare reports, and what it does about it.
PROBLEM_ACTIONS: dict[str, str] = {
    "encoding": "fixed",  # a CSV not in UTF-8 (nor UTF-16/32): read as Windows-1252 (or Latin-1)
    "missing_column": "fixed",  # optional column absent: filled with empty values
    "missing_image_id": "skipped",
    "unknown_dx": "skipped",  # label unknown (ISIC's UNK, "unknown") or not a plain class name
    "ambiguous_label": "skipped",  # ISIC one-hot row with no class column at 1, or several
    "listed_twice": "fixed",  # identical rows: kept once
    "duplicate_image_id": "skipped",  # rows with one image_id that disagree: label is ambiguous
    "missing_lesion_id": "fixed",  # treated as a lesion of its own
    "missing_image": "skipped",
    "unsafe_path": "skipped",  # an absolute path, ``..`` or a symlink leading outside the source: never read
    "duplicate_file": "fixed",  # identical copies in two image folders: first one used
    "conflicting_files": "skipped",  # different files with the same image_id
    "unlisted_image": "skipped",  # an image file no CSV row names (or outside every class folder)
    "unreadable": "skipped",
    "truncated": "skipped",
    "too_large": "skipped",  # header dimensions over the pixel cap: refused before decoding
    "converted": "fixed",  # grayscale, RGBA, CMYK, palette, 16-bit...: converted to 8-bit RGB
    # several sources in one set (dermcam.data.prepare): an image found in two sources counts once
    # the same file, or a near-duplicate, in an earlier source: counted once (like listed_twice)
    "duplicate_across_sources": "fixed",
    "conflicting_labels": "skipped",  # the same file in two sources under different labels: every copy left out
}


@dataclass(frozen=True)
class Problem:
    """One problem found in the source; the full list goes to ``problems.csv``."""

    file: str
    image_id: str
    kind: str
    detail: str

    @property
    def action(self) -> str:
        return PROBLEM_ACTIONS[self.kind]

    def row(self) -> dict[str, str]:
        return {"file": self.file, "image_id": self.image_id, "kind": self.kind, "action": self.action,
                "detail": self.detail}


def problem_counts(problems: list[Problem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.kind] = counts.get(problem.kind, 0) + 1
    return {k: counts[k] for k in PROBLEM_ACTIONS if k in counts}
