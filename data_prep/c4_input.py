"""C4 input: find the json.gz files, read their documents, and account for every line that is not one.

A C4 file holds one JSON object per line, `{"text", "timestamp", "url"}`. Reading yields the `text` of each
good line in order; every bad line (malformed JSON, missing or non-string text, empty document, invalid
UTF-8) and every unreadable file (missing, empty, truncated or corrupt gzip) is counted in an `InputReport`
with its 1-based line number — or, under `strict`, raised as `BadInput` naming the file and the line.
The Hugging Face branch (`hf_records`) feeds records of the streamed dataset through the same checks.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

C4_SUFFIX = ".json.gz"
C4_SHARD_NUMBER = re.compile(r"\.(\d+)-of-\d+$")  # c4-train.00123-of-01024 -> 123
MAX_REPORTED_BAD_LINES = 20  # examples kept per file: enough to find the problem, small in the manifest

# Kinds of bad lines, as counted in the manifest.
MALFORMED_JSON = "malformed_json"
BAD_TEXT = "bad_text"  # not an object, no "text", or "text" is not a string
EMPTY_DOCUMENT = "empty_document"  # text is empty or whitespace only
INVALID_UTF8 = "invalid_utf8"  # undecodable bytes, or a lone surrogate escape such as "\ud800"
# Kinds of unreadable files.
MISSING_INPUT = "missing_input"
EMPTY_INPUT = "empty_input"  # no line at all
TRUNCATED_GZIP = "truncated_gzip"
CORRUPT_GZIP = "corrupt_gzip"


class BadInput(ValueError):
    """Bad input met under --strict; the message names the file and the line."""


@dataclass
class InputReport:
    """What reading one input found: bad lines by kind, the first examples, and a file-level error if any."""

    where: str
    strict: bool = False
    lines: int = 0
    bad_lines: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    read_error: dict | None = None

    def bad_line(self, *, line: int, kind: str, detail: str) -> None:
        """Count a bad line (raise BadInput under strict)."""
        if self.strict:
            raise BadInput(f"{self.where}:{line}: {kind}: {detail}")
        self.bad_lines[kind] += 1
        if len(self.examples) < MAX_REPORTED_BAD_LINES:
            self.examples.append({"line": line, "kind": kind, "detail": detail})

    def unreadable(self, *, kind: str, detail: str) -> None:
        """Record why the file could not be read (further), after `self.lines` good or bad lines."""
        if self.strict:
            raise BadInput(f"{self.where}:{self.lines}: {kind}: {detail}")
        self.read_error = {"kind": kind, "after_line": self.lines, "detail": detail}

    def as_record(self) -> dict:
        """The report as stored in a shard's manifest record."""
        return {
            "lines": self.lines,
            "bad_lines": dict(sorted(self.bad_lines.items())),
            "bad_line_examples": self.examples,
            "read_error": self.read_error,
        }


def list_inputs(pattern: str) -> list[str]:
    """The C4 files named by `pattern` (a directory, a glob or one file), sorted; raises if there are none."""
    if os.path.isdir(pattern):
        paths = glob.glob(os.path.join(pattern, "*" + C4_SUFFIX))
    else:
        paths = glob.glob(pattern)
    paths = sorted(os.path.abspath(p) for p in paths if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no input: {pattern!r} names no file (expected C4 *{C4_SUFFIX} files)")
    return paths


def shard_name(path: str) -> str:
    """The shard name of an input file: its base name without .json.gz (c4-train.00000-of-01024)."""
    base = os.path.basename(path)
    return base[: -len(C4_SUFFIX)] if base.endswith(C4_SUFFIX) else base


def shard_indices(names: list[str]) -> dict[str, int]:
    """The shard index of each name: NNNNN of a C4 name `*.NNNNN-of-MMMMM`, else its sorted position.

    The index seeds the pause positions, so it must not depend on which subset of files a run is given;
    C4's own numbering guarantees that. Raises if two names share an index (e.g. train and validation mixed).
    """
    indices = {}
    for position, name in enumerate(sorted(names)):
        match = C4_SHARD_NUMBER.search(name)
        indices[name] = int(match.group(1)) if match else position
    seen: dict[int, str] = {}
    for name, index in indices.items():
        if index in seen:
            raise ValueError(f"inputs {seen[index]} and {name} share shard index {index}: build them separately")
        seen[index] = name
    return indices


def document_text(record, *, line: int, report: InputReport) -> str | None:
    """The text of a parsed C4 record, or None after counting why it is not a usable document."""
    if not isinstance(record, dict):
        report.bad_line(line=line, kind=BAD_TEXT, detail=f"a JSON {type(record).__name__}, not an object")
        return None
    text = record.get("text")
    if not isinstance(text, str):
        detail = "no 'text' key" if "text" not in record else f"'text' is a {type(text).__name__}"
        report.bad_line(line=line, kind=BAD_TEXT, detail=detail)
        return None
    if not text or text.isspace():
        report.bad_line(line=line, kind=EMPTY_DOCUMENT, detail="empty text")
        return None
    if text.isascii():  # constant time in CPython; C4 is mostly ASCII
        return text
    try:
        text.encode("utf-8")  # a JSON escape may spell a lone surrogate, which is not text
    except UnicodeEncodeError as e:
        report.bad_line(line=line, kind=INVALID_UTF8, detail=str(e))
        return None
    return text


def read_c4_file(path: str, *, report: InputReport) -> Iterator[str]:
    """Yield the text of each good document of a C4 json.gz file, in order; count everything else."""
    try:
        with gzip.open(path, "rb") as f:
            for report.lines, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    report.bad_line(line=report.lines, kind=INVALID_UTF8, detail=str(e))
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    report.bad_line(line=report.lines, kind=MALFORMED_JSON, detail=f"{e.msg} at column {e.colno}")
                    continue
                text = document_text(record, line=report.lines, report=report)
                if text is not None:
                    yield text
    except FileNotFoundError as e:
        report.unreadable(kind=MISSING_INPUT, detail=str(e))
        return
    except EOFError as e:  # the gzip stream stops before its end marker: a partial download
        report.unreadable(kind=TRUNCATED_GZIP, detail=str(e))
        return
    except (gzip.BadGzipFile, zlib.error) as e:
        report.unreadable(kind=CORRUPT_GZIP, detail=str(e))
        return
    if report.lines == 0:
        report.unreadable(kind=EMPTY_INPUT, detail="the file holds no line")


def check_records(records: Iterable[dict], *, report: InputReport) -> Iterator[str]:
    """Yield the text of each usable record of a streamed dataset (record k counts as line k)."""
    for report.lines, record in enumerate(records, start=1):
        text = document_text(record, line=report.lines, report=report)
        if text is not None:
            yield text
    if report.lines == 0:
        report.unreadable(kind=EMPTY_INPUT, detail="the stream chunk holds no record")


def hf_records(*, path: str, config: str, split: str) -> Iterator[dict]:
    """Records of a Hugging Face dataset through `datasets` streaming (needs the hub; not reachable here)."""
    import datasets  # imported here: only the --hf branch needs it, and it is slow to import

    return iter(datasets.load_dataset(path, config, split=split, streaming=True))
