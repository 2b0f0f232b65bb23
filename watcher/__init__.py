"""The watcher: S3 documents in, OCR results (JSON + Markdown) out."""

__version__ = "0.1.0"
