"""Regenerate watcher/samples/ (the demo's documents): python tests/make_samples.py"""

from __future__ import annotations

from pathlib import Path

import rudocs
from docgen import make_image, make_pdf, make_tiff

OUT = Path(__file__).resolve().parent.parent / "watcher" / "samples"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "invoice.pdf").write_bytes(make_pdf([
        ["INVOICE 2041", "Northwind Traders", "Total due 1250.00 EUR"],
        ["Page two of the invoice", "Payment within thirty days"],
    ]))
    (OUT / "letter.png").write_bytes(make_image(
        ["Dear customer", "Your parcel has shipped", "Tracking number 88812"], "PNG"))
    (OUT / "receipt scan.jpg").write_bytes(make_image(
        ["Coffee house receipt", "Espresso 2.50", "Croissant 3.10"], "JPEG"))
    (OUT / "contract.tiff").write_bytes(make_tiff([
        ["Service agreement", "between Alpha and Beta"],
        ["Signed in Moscow", "November 2026"],
    ]))
    (OUT / "notes.pdf").write_bytes(b"These are plain text notes, not a PDF at all.\n")
    # Russian, as our users' documents are: a born-digital contract (read from its text
    # layer) and a sideways, degraded scan of a standard's first page (OCR, turned upright).
    (OUT / "договор поставки.pdf").write_bytes(rudocs.ru_pdf([rudocs.RUSSIAN_TEXT[0]]))
    scan = rudocs.degrade(rudocs.render_pages(rudocs.ru_pdf([rudocs.RUSSIAN_TEXT[1]]), dpi=150)[0], seed=7)
    (OUT / "скан стандарта.jpg").write_bytes(
        rudocs.image_bytes(scan.rotate(90, expand=True, fillcolor="white"), "JPEG", quality=70))


if __name__ == "__main__":
    main()
