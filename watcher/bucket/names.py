"""Where things live in the bucket: source key -> result, error and lease keys."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from watcher.core.settings import Settings

SOURCE_ETAG_META = "source-etag"  # x-amz-meta-source-etag on every result object
SOURCE_SHA256_META = "source-sha256"  # the content's SHA-256, for re-pointing identical uploads
ASSETS_META = "assets"  # on a result JSON: how many figure assets it has under <rel>.assets/
ASSETS_DIR = ".assets/"
# S3 caps keys at 1,024 bytes; filer-backed stores (SeaweedFS) also cap each "/" segment
# at 255 bytes, answering KeyTooLongError.
ERROR_SUFFIX = ".error"
ERROR_MARKER = ".error"  # the suffix of a done-marker that stands for an error record
MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255


def key_fits(key: str) -> bool:
    """True when every S3 store we support accepts `key` as an object name."""
    return len(key.encode("utf-8")) <= MAX_KEY_BYTES and all(
        len(segment.encode("utf-8")) <= MAX_SEGMENT_BYTES for segment in key.split("/")
    )


CHUNKS_SUFFIX = ".chunks.jsonl"
DOCLING_SUFFIX = ".docling.json"
EXTRA_SUFFIXES = (CHUNKS_SUFFIX, DOCLING_SUFFIX)


def extra_suffixes(settings: Settings) -> tuple[str, ...]:
    """The files the settings ask for beside each result."""
    return ((CHUNKS_SUFFIX,) if settings.chunks else ()) + (
        (DOCLING_SUFFIX,) if "docling" in settings.output_formats() else ())


@dataclass(frozen=True)
class Names:
    input_prefix: str
    output_prefix: str
    lease_prefix: str
    done_prefix: str
    # Files written beside each result (WATCHER_CHUNKS, WATCHER_OUTPUTS): their names must fit too.
    extras: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Names:
        return cls(
            settings.input_prefix, settings.output_prefix, settings.lease_prefix,
            settings.done_prefix, extra_suffixes(settings),
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

    def result_assets(self, key: str) -> str:
        """The folder of the result's figures: `<output prefix><rel>.assets/`."""
        return f"{self.output_prefix}{self.relative(key)}{ASSETS_DIR}"

    def asset_folder(self, key: str) -> str:
        """The same folder as the result's Markdown links it: beside it, by its name."""
        return f"{self.relative(key).rsplit('/', 1)[-1]}{ASSETS_DIR.rstrip('/')}"

    def result_extra(self, key: str, suffix: str) -> str:
        """A file written beside the result (`.chunks.jsonl`, `.docling.json`)."""
        return f"{self.output_prefix}{self.relative(key)}{suffix}"

    def error_json(self, key: str) -> str:
        return f"{self.output_prefix}{self.relative(key)}{ERROR_SUFFIX}.json"

    def shadowed_by(self, key: str) -> str | None:
        """The source whose error record would share this source's result name, if any.

        Results are `<rel>.json` and error records `<rel>.error.json`, so the result of
        `y.png.error` and the error record of `y.png` have one name. The rule: when both
        sources exist, `y.png` keeps its names and `y.png.error` gets a `name_collision`
        error record (`y.png.error.error.json`) instead of a result.
        """
        return key[: -len(ERROR_SUFFIX)] if key.endswith(ERROR_SUFFIX) else None

    def lease(self, key: str) -> str:
        """The claim object of a source: named after the full source key, so that
        deployments watching different prefixes of one bucket never share one; hashed
        when that name would be too long for the store."""
        readable = f"{self.lease_prefix}{key}.lease"
        if key_fits(readable):
            return readable
        return f"{self.lease_prefix}_sha256/{hashlib.sha256(key.encode('utf-8')).hexdigest()}.lease"

    @property
    def source_leases_prefix(self) -> str:
        """Where the readable leases of sources live (hashed ones are under `_sha256/`)."""
        return f"{self.lease_prefix}{self.input_prefix}"

    def source_of_lease(self, lease_key: str) -> str | None:
        """The source key a readable lease key belongs to."""
        if not (lease_key.startswith(self.source_leases_prefix) and lease_key.endswith(".lease")):
            return None
        return lease_key[len(self.lease_prefix):-len(".lease")]

    def sources_of(self, output_key: str) -> list[str]:
        """The source keys whose result, Markdown or error record `output_key` may be
        (`y.png.error.json` is y.png's error record or y.png.error's result)."""
        rel = output_key[len(self.output_prefix):] if output_key.startswith(self.output_prefix) else ""
        if ASSETS_DIR in rel:  # a figure of `<rel>.assets/...`
            return [f"{self.input_prefix}{rel.rsplit(ASSETS_DIR, 1)[0]}"]
        return [f"{self.input_prefix}{rel[: -len(suffix)]}"
                for suffix in (f"{ERROR_SUFFIX}.json", ".json", ".md", *EXTRA_SUFFIXES)
                if rel.endswith(suffix) and len(rel) > len(suffix)]

    @property
    def fleet_prefix(self) -> str:
        """Where one deployment's fleet objects (the lister's lease, the manifest) live:
        named after its input and output prefixes, so that deployments watching different
        prefixes of one bucket never follow each other's lister."""
        digest = hashlib.sha256(f"{self.input_prefix}\n{self.output_prefix}".encode()).hexdigest()
        return f"{self.lease_prefix}_fleet/{digest[:16]}/"

    @property
    def lister_key(self) -> str:
        """The pseudo source key whose lease (`lease()`) the fleet's lister holds."""
        return f"{self.fleet_prefix[len(self.lease_prefix):]}lister"

    @property
    def manifest(self) -> str:
        return f"{self.fleet_prefix}manifest.json"

    @property
    def markers_prefix(self) -> str:
        """Where done-markers live: one empty object per finished source version, so that
        done-ness is read from a listing, not from a HEAD per result."""
        return f"{self.lease_prefix}_done/"

    def marker_dir(self, key: str) -> str:
        return f"{self.markers_prefix}{hashlib.sha256(key.encode('utf-8')).hexdigest()}/"

    def marker(self, key: str, etag: str, error: bool = False) -> str:
        """The done-marker of a version: `<etag>` for a result, `<etag>.error` for an error
        record (a failed source stays in the input prefix, whatever WATCHER_SOURCE_ACTION)."""
        return f"{self.marker_dir(key)}{etag}{ERROR_MARKER if error else ''}"

    def markers(self, key: str, etag: str) -> tuple[str, str, str]:
        """(marker_dir, result marker, error-record marker) of a version, hashing the key
        once: discovery asks for them for every object it lists."""
        folder = self.marker_dir(key)
        return folder, f"{folder}{etag}", f"{folder}{etag}{ERROR_MARKER}"

    def result_keys_fit(self, key: str) -> bool:
        names = [self.result_json(key), self.result_markdown(key),
                 *(self.result_extra(key, suffix) for suffix in self.extras)]
        return all(key_fits(name) for name in names)

    def done(self, key: str) -> str:
        return f"{self.done_prefix}{self.relative(key)}"


def shard_of(key: str, count: int) -> int:
    """Stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count
