"""Character accuracy and pages per second on generated Russian documents, in one run:
the PDF text layer against OCR (the CPU engine, Tesseract rus+eng) of the same pages, born
digital and as degraded scans.

    .venv/bin/python bench/russian_ocr.py [--dpi 150] [--fonts DejaVuSans.ttf,...]

Also the pages whose text layer is someone else's mistake: archive scans with the
invisible layer of an OCR that knew no Russian, the same scans with a right invisible
layer, and born-digital pages whose font maps Cyrillic glyphs to Latin look-alikes. For
them the "text_layer" row is what the layer alone gives, and "decided" what the watcher
gives: the layer judged by its words (pipeline/words.py) and, when doubtful, the better
of the layer and the OCR reading. Last, the cost of judging words on every born-digital
page against the text-layer path's own time.

Accuracy is 1 - normalised Levenshtein distance between the known text and what came
back, whitespace collapsed; "cyrillic" is the share of letters in the output that are
Cyrillic (the old RapidOCR engine gave under 3 % on Russian). Speeds are single-process,
one page at a time, so ratios between rows mean more than the absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import rudocs  # noqa: E402

from watcher.engines.cpu import CpuReader  # noqa: E402
from watcher.pipeline import words  # noqa: E402
from watcher.pipeline.decode import Document, Limits, open_document  # noqa: E402
from watcher.pipeline.recognise import engine_reads_better, is_doubtful  # noqa: E402


def cyrillic_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum("\u0400" <= c <= "\u04ff" for c in letters) / max(len(letters), 1)


def documents(fonts: list[str], sizes: list[float]) -> list[tuple[str, bytes, list[str]]]:
    """(name, PDF, known text per page): born-digital in each font and size, then scans."""
    pages = [*rudocs.RUSSIAN_TEXT, *rudocs.MIXED_TEXT]
    truth = ["\n".join(lines) for lines in pages]
    out: list[tuple[str, bytes, list[str]]] = []
    for font in fonts:
        for size in sizes:
            out.append((f"born-digital {font} {size:g}pt", rudocs.ru_pdf(pages, font=font, size=size), truth))
    base = rudocs.ru_pdf(pages, font=fonts[0], size=12)
    images = rudocs.render_pages(base, dpi=200)
    out.append(("scan 200dpi, degraded", rudocs.scan_pdf(
        [rudocs.degrade(im, seed) for seed, im in enumerate(images)]), truth))
    out.append(("scan 200dpi, clean", rudocs.scan_pdf(images), truth))
    return out


def layered(pages: list[list[str]]) -> list[tuple[str, bytes, list[str]]]:
    """Documents whose text layer is not the author's: one page per document (the
    generators make one-page PDFs), named by case."""
    out: list[tuple[str, bytes, list[str]]] = []
    for n, lines in enumerate(pages):
        truth = ["\n".join(lines)]
        out.append((f"scan + foreign OCR layer #{n + 1}", rudocs.ocr_layer_scan_pdf(lines), truth))
        out.append((f"scan + right OCR layer #{n + 1}", rudocs.ocr_layer_scan_pdf(lines, lines), truth))
        out.append((f"born-digital, look-alike font #{n + 1}", rudocs.pdf_lookalike_text_layer(lines), truth))
    return out


def run_path(
    doc: Document, truth: list[str], read: Callable[[Document, int], str]
) -> tuple[list[float], list[float], float]:
    scores, shares = [], []
    started = time.perf_counter()
    for index, known in enumerate(truth):
        text = read(doc, index)
        scores.append(rudocs.similarity(known, text))
        shares.append(cyrillic_share(text))
    return scores, shares, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpi", type=int, default=150, help="render resolution (WATCHER_RENDER_DPI)")
    parser.add_argument("--fonts", default="DejaVuSans.ttf,DejaVuSerif.ttf,DejaVuSansMono.ttf")
    parser.add_argument("--sizes", default="9,12")
    parser.add_argument("--languages", default="rus+eng")
    args = parser.parse_args()
    fonts = args.fonts.split(",")
    sizes = [float(s) for s in args.sizes.split(",")]
    reader = CpuReader(languages=args.languages)
    reader.warm()
    limits = Limits(max_pages=100, max_page_pixels=60_000_000, render_dpi=args.dpi)

    def text_layer(doc: Document, index: int) -> str:
        layer = doc.text_layer(index)
        return layer.result.markdown if layer is not None and layer.trusted else ""

    def ocr(doc: Document, index: int) -> str:
        return reader.recognise(doc.render(index)).markdown

    langs = words.languages(args.languages)

    def decided(doc: Document, index: int) -> str:
        layer = doc.text_layer(index)
        if layer is None or not layer.trusted:
            return ocr(doc, index)
        found = words.score(layer.result.text, langs)
        if not is_doubtful(layer, found):
            return layer.result.markdown
        read = reader.recognise(doc.render(index))
        better = engine_reads_better(found, words.score(read.text, langs))
        return read.markdown if better else layer.result.markdown

    rows = []
    totals: dict[str, list[float]] = {"text_layer": [], "ocr": []}
    seconds: dict[str, float] = {"text_layer": 0.0, "ocr": 0.0}
    count: dict[str, int] = {"text_layer": 0, "ocr": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data, truth in documents(fonts, sizes):
            path = Path(tmp) / "doc.pdf"
            path.write_bytes(data)
            doc = open_document(path, len(data), limits)
            paths = [("ocr", ocr)] if name.startswith("scan") else [("text_layer", text_layer), ("ocr", ocr)]
            for label, read in paths:
                scores, shares, elapsed = run_path(doc, truth, read)
                rows.append((name, label, statistics.mean(scores), min(scores),
                             statistics.mean(shares), len(truth) / elapsed))
                if not name.startswith("scan"):
                    totals[label] += scores
                    seconds[label] += elapsed
                    count[label] += len(truth)
            doc.close()
        layered_rows = []
        judge_seconds = 0.0
        words.score("прогрев словаря", langs)  # wordfreq loads its lists once, on first use
        for name, data, truth in layered(pages_of_rudocs()):
            path = Path(tmp) / "layered.pdf"
            path.write_bytes(data)
            doc = open_document(path, len(data), limits)
            for label, read in (("text_layer", _layer_as_is), ("decided", decided)):
                scores, _shares, elapsed = run_path(doc, truth, read)
                layered_rows.append((name, label, statistics.mean(scores), len(truth) / elapsed))
            doc.close()
        for name, data, truth in documents(fonts, sizes):
            if name.startswith("scan"):
                continue
            path = Path(tmp) / "doc.pdf"
            path.write_bytes(data)
            doc = open_document(path, len(data), limits)
            for index in range(len(truth)):
                layer = doc.text_layer(index)
                assert layer is not None
                started = time.perf_counter()
                words.score(layer.result.text, langs)
                judge_seconds += time.perf_counter() - started
            doc.close()
    print(f"CPU engine: Tesseract {args.languages}, render {args.dpi} dpi; "
          f"{len(rudocs.RUSSIAN_TEXT)} Russian pages + {len(rudocs.MIXED_TEXT)} mixed per document\n")
    print("| document | path | accuracy (mean) | accuracy (worst page) | cyrillic share | pages/s |")
    print("|---|---|---|---|---|---|")
    for name, label, mean, worst, share, speed in rows:
        print(f"| {name} | {label} | {mean:.3f} | {worst:.3f} | {share:.2f} | {speed:.2f} |")
    tl = count["text_layer"] / seconds["text_layer"]
    oc = count["ocr"] / seconds["ocr"]
    print(f"\nborn-digital pages: text layer {statistics.mean(totals['text_layer']):.3f} accuracy at "
          f"{tl:.1f} pages/s; OCR {statistics.mean(totals['ocr']):.3f} at {oc:.2f} pages/s; "
          f"text layer {tl / oc:.0f}x faster")
    print("\n| text layer not the author's | path | accuracy | pages/s |")
    print("|---|---|---|---|")
    for name, label, mean, speed in layered_rows:
        print(f"| {name} | {label} | {mean:.3f} | {speed:.2f} |")
    per_page = judge_seconds / count["text_layer"]
    layer_page = seconds["text_layer"] / count["text_layer"]
    print(f"\njudging words on a born-digital page: {1000 * per_page:.2f} ms against "
          f"{1000 * layer_page:.2f} ms for the text-layer path, {100 * per_page / layer_page:.1f} %")


def pages_of_rudocs() -> list[list[str]]:
    return [list(lines) for lines in (*rudocs.RUSSIAN_TEXT, *rudocs.MIXED_TEXT)]


def _layer_as_is(doc: Document, index: int) -> str:
    layer = doc.text_layer(index)
    return layer.result.markdown if layer is not None and layer.trusted else ""


if __name__ == "__main__":
    main()
