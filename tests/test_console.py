"""What a person reads: one line per document, the summaries at Ctrl-C and at the end of
`--once`, the log format a terminal gets, and the words for files that are not documents.
(The demo in a real terminal and `--once` as a subprocess are in test_demo and test_cli.)"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from docgen import make_pdf

from watcher.core.errors import DocumentError, ErrorCode
from watcher.core.logs import resolve_format
from watcher.core.outcome import Outcome, Report
from watcher.core.refs import ObjectRef
from watcher.pipeline.decode import Limits, not_a_document, open_document
from watcher.service.console import (
    MESSAGE_SHOWN,
    DocumentLines,
    OnceRun,
    Stopped,
    counted,
    document_line,
    once_summary,
    stop_summary,
)
from watcher.service.hooks import LastOutcomes

LIMITS = Limits(max_pages=10, max_page_pixels=50_000_000, render_dpi=150)


def ref(key: str) -> ObjectRef:
    return ObjectRef("documents", key, "e" * 32, 10)


def report(key: str, outcome: Outcome, **fields: object) -> Report:
    return Report(ref(key), outcome, **fields)  # type: ignore[arg-type]


def test_each_finished_document_gets_one_line_saying_where_its_result_is() -> None:
    said: list[str] = []
    lines = DocumentLines(said.append)
    lines.ended(report("input/x.pdf", Outcome.DONE, seconds=5.71, output="output/x.pdf.json", pages=3))
    lines.ended(report("input/one.png", Outcome.DONE, seconds=0.4, output="output/one.png.json", pages=1))
    lines.ended(report("input/y.txt", Outcome.ERROR, seconds=0.1, output="output/y.txt.error.json",
                       code="unsupported_format", message="the content is text, not a document"))
    lines.ended(report("input/z.pdf", Outcome.RETRY, message="S3 unavailable: timeout"))
    # Held by another replica: it comes back by itself, so nothing to tell.
    lines.ended(report("input/h.pdf", Outcome.HELD, retry_at=1.0))
    assert said == [
        "done   input/x.pdf → output/x.pdf.json  3 pages  5.7 s",
        "done   input/one.png → output/one.png.json  1 page  0.4 s",
        "error  input/y.txt → output/y.txt.error.json  unsupported_format: "
        "the content is text, not a document",
        "later  input/z.pdf  S3 unavailable: timeout (tried again later)",
    ]


def test_a_long_message_is_cut_on_the_line_and_kept_whole_in_the_record() -> None:
    line = document_line(report("input/y.pdf", Outcome.ERROR, output="output/y.pdf.error.json",
                                code="corrupt", message="word " * 100))
    assert line is not None and line.endswith("…")
    assert len(line.split("corrupt: ", 1)[1]) == MESSAGE_SHOWN


def test_the_counts_name_the_runs_that_settled_a_document() -> None:
    outcomes = LastOutcomes()
    for r in (report("input/a.pdf", Outcome.RETRY), report("input/a.pdf", Outcome.DONE),
              report("input/b.pdf", Outcome.DONE), report("input/c.pdf", Outcome.ERROR)):
        outcomes.ended(r)
    # The retry is not a fourth document: a came back and was done.
    assert counted(outcomes.counts) == "2 done, 1 error record"
    assert counted(Counter()) == "0 done, 0 error records"
    assert counted(Counter({Outcome.DONE: 1, Outcome.SKIPPED: 2})) == "1 done, 0 error records, 2 skipped"


def test_the_stop_summary_says_what_was_done_released_and_where_results_are() -> None:
    calm = stop_summary(Stopped(Counter({Outcome.DONE: 9, Outcome.ERROR: 1}), 0, "s3://documents/output/"))
    assert calm == ["stopped: 9 done, 1 error record since start; results in s3://documents/output/",
                    "  nothing was in flight: every document taken was finished"]
    cut = stop_summary(Stopped(Counter({Outcome.DONE: 1}), 2, "s3://documents/output/"))
    assert "2 document(s) in flight were released unfinished" in cut[1] and "reads them again" in cut[1]


def test_the_once_summary_names_each_failure_and_each_earlier_error_record() -> None:
    failed = report("input/scan.pdf", Outcome.ERROR, output="output/scan.pdf.error.json", code="corrupt")
    held = report("input/busy.pdf", Outcome.HELD, message="held by another replica")
    earlier = [(f"input/old{n}.txt", f"output/old{n}.txt.error.json") for n in range(53)]
    lines = once_summary(OnceRun(Counter({Outcome.DONE: 12, Outcome.ERROR: 1}), [failed], [held],
                                 earlier, None))
    assert lines[0] == "--once: 12 done, 1 error record, 1 not finished"
    assert "error  input/scan.pdf → output/scan.pdf.error.json  corrupt" in lines
    assert "not finished  input/busy.pdf (held: held by another replica)" in lines
    assert "53 source(s) already had an error record and were not read again" in lines[3]
    assert "  input/old0.txt → output/old0.txt.error.json" in lines
    assert lines[-1] == "  … and 3 more"  # bounded: a backfill can have thousands
    clean = once_summary(OnceRun(Counter({Outcome.DONE: 2}), [], [], [], None))
    assert clean == ["--once: 2 done, 0 error records"]
    short = once_summary(OnceRun(Counter(), [], [], [], "S3 could not be listed at http://x"))
    assert short[-1] == "S3 could not be listed at http://x"


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_auto_logs_are_for_people_on_a_terminal_and_json_elsewhere() -> None:
    assert resolve_format("auto", Stream(tty=True)) == "human"
    assert resolve_format("auto", Stream(tty=False)) == "json"
    for chosen in ("json", "console", "human"):  # asked for: kept, terminal or not
        assert resolve_format(chosen, Stream(tty=True)) == chosen


def office_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("word/document.xml", "<w:document/>")
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "data", "says"), [
    ("notes.pdf", "Заметки к договору\nпункт 1\n".encode(), "the content is text, not a document"),
    ("notes.txt", b"plain words\n", "the content is text, not a document"),
    ("page.pdf", b"<!DOCTYPE html><html><body>login</body></html>", "the content is an HTML page"),
    ("contract.docx", office_file(), "a ZIP archive (Word, Excel and OpenDocument"),
    ("old.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100), "an old Microsoft Office file"),
    ("photo.jpg", b"\x00\x00\x00\x18ftypheic" + bytes(100), "a HEIC photo (export it as JPEG)"),
    ("blob.bin", bytes(range(256)), "the content is not a document the watcher reads"),
])
def test_files_that_are_not_documents_are_named_for_what_they_are(
    tmp_path: Path, name: str, data: bytes, says: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DocumentError) as info:
        open_document(path, len(data), LIMITS, key=f"input/{name}")
    message = str(info.value)
    assert info.value.code is ErrorCode.UNSUPPORTED_FORMAT
    assert says in message and "convert it to PDF or an image" in message, message
    suffix = Path(name).suffix
    # A name that promises a document we read is called out; other names are not blamed.
    if suffix in {".pdf", ".jpg"}:
        assert f"its name ends in '{suffix}' but its bytes are not a {suffix} file" in message
    else:
        assert f"; '{suffix}' files are not among them; convert" in message, message


def test_a_real_document_is_not_taken_for_one_that_is_not(tmp_path: Path) -> None:
    data = make_pdf([["Real page"]])
    assert "not" in not_a_document(b"x", ".pdf")  # the wording exists for what sniffing refuses
    path = tmp_path / "real.txt"  # a PDF by content, whatever its name
    path.write_bytes(data)
    assert open_document(path, len(data), LIMITS, key="input/real.txt").page_count == 1
