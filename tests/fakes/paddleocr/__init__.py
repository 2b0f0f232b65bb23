"""A FAKE `paddleocr` package for daemon processes started by the tests (PYTHONPATH):
it exposes only the labelled fake pipeline in tests/fakes/fake_paddleocr.py."""

from fake_paddleocr import PaddleOCRVL

__all__ = ["PaddleOCRVL"]
