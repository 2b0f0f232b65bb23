"""Regenerate watcher/samples/ (the demo's documents): python tests/make_samples.py"""

from __future__ import annotations

from pathlib import Path

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


if __name__ == "__main__":
    main()
