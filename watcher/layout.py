"""Where things live in the bucket: source key -> result, error and lease keys."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from watcher.settings import Settings

SOURCE_ETAG_META = "source-etag"  # x-amz-meta-source-etag on every result object


@dataclass(frozen=True)
class Layout:
    input_prefix: str
    output_prefix: str
    lease_prefix: str
    done_prefix: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Layout:
        return cls(
            settings.input_prefix, settings.output_prefix, settings.lease_prefix,
            settings.done_prefix,
        )

    def relative(self, key: str) -> str:
        return key[len(self.input_prefix):]

    def is_document_key(self, key: str) -> bool:
        """Folder markers (keys ending in '/') and the prefix itself are not documents."""
        return key.startswith(self.input_prefix) and bool(self.relative(key)) and not key.endswith("/")

    def result_json(self, key: str) -> str:
        return f"{self.output_prefix}{self.relative(key)}.json"

    def result_markdown(self, key: str) -> str:
        return f"{self.output_prefix}{self.relative(key)}.md"

    def error_json(self, key: str) -> str:
        return f"{self.output_prefix}{self.relative(key)}.error.json"

    def lease(self, key: str) -> str:
        return f"{self.lease_prefix}{self.relative(key)}.lease"

    def done(self, key: str) -> str:
        return f"{self.done_prefix}{self.relative(key)}"


def shard_of(key: str, count: int) -> int:
    """Stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count
