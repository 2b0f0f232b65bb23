"""The CPU engine: Tesseract (LSTM) through tesserocr, reading Russian and English.

tesserocr's wheel carries libtesseract; the language data comes from Debian's packages
(`tesseract-ocr-rus`, `tesseract-ocr-eng`, `tesseract-ocr-osd`), found in the usual
tessdata directories or `WATCHER_TESSDATA_DIR`. Nothing is downloaded at run time.

Pages are turned upright first: Tesseract's orientation detection (OSD) proposes a
rotation; when it is unsure the page is read both ways and the more confident reading
kept, since OSD misjudges pages with little text.

`CpuReader` is the synchronous core; the daemon runs it in supervised worker processes
(`create_engine`, watcher/engines/supervisor.py). `CpuEngine` runs the same reader on
threads of the calling process, for the test suite and tools that share one warm model.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from PIL import Image

from watcher.core.pages import Block, PageResult, RenderedPage, with_figures
from watcher.engines.base import Engine, check_warm_page, synthetic_page

DEFAULT_LANGUAGES = "rus+eng"
TESSDATA_DIRS = (
    "/usr/share/tesseract-ocr/5/tessdata",
    "/usr/share/tesseract-ocr/4.00/tessdata",
    "/usr/share/tessdata",
    "/usr/local/share/tessdata",
    "/opt/homebrew/share/tessdata",
)
# OSD's confidence on a clean page is ~14. Below MIN it is guessing; between the two the
# page is read both ways and the more confident reading wins.
MIN_ORIENTATION_CONFIDENCE = 1.5
SURE_ORIENTATION_CONFIDENCE = 6.0
# Lines Tesseract finds in pictures and noise: no letter or digit and little confidence.
MIN_SYMBOL_LINE_CONFIDENCE = 60.0


# Tesseract's block types (tesserocr.PT) for pictures: flowing, heading and pull-out images.
_IMAGE_BLOCKS = {9, 10, 11}
MIN_PICTURE_PIXELS = 32

# OSD names the script too (script_conf ~3-5 on a clean page of text). A page in a script
# none of WATCHER_OCR_LANGUAGES writes comes out as confident noise in theirs: it is said,
# and read with the script's language where its data is installed.
MIN_SCRIPT_CONFIDENCE = 2.0
# Tesseract languages by script; any other language is taken to be written in Latin.
SCRIPT_OF_LANGUAGES = {
    "Cyrillic": {"rus", "ukr", "bel", "bul", "srp", "mkd", "kaz", "kir", "tgk", "mon", "tat", "bak", "chv"},
    "Greek": {"ell", "grc"},
    "Han": {"chi_sim", "chi_tra", "chi_sim_vert", "chi_tra_vert", "jpn", "jpn_vert"},
    "Japanese": {"jpn", "jpn_vert"},
    "Korean": {"kor", "kor_vert"},
    "Hangul": {"kor", "kor_vert"},
    "Arabic": {"ara", "fas", "urd", "pus", "uig"},
    "Hebrew": {"heb", "yid"},
    "Devanagari": {"hin", "mar", "nep", "san"},
    "Thai": {"tha"},
    "Armenian": {"hye"},
    "Georgian": {"kat", "kat_old"},
}
# The language that reads a script best when none configured does (its Debian package is
# tesseract-ocr-<code with - for _>).
READER_OF_SCRIPT = {
    "Greek": "ell", "Han": "chi_sim", "Japanese": "jpn", "Korean": "kor", "Hangul": "kor",
    "Arabic": "ara", "Hebrew": "heb", "Devanagari": "hin", "Thai": "tha", "Armenian": "hye",
    "Georgian": "kat", "Cyrillic": "rus", "Latin": "eng",
}


def script_of(language: str) -> str:
    return next((script for script, langs in SCRIPT_OF_LANGUAGES.items() if language in langs), "Latin")


def debian_package(language: str) -> str:
    return "tesseract-ocr-" + language.replace("_", "-").lower()


class TessdataMissing(RuntimeError):
    pass


def find_tessdata(languages: str, configured: str | None = None) -> Path:
    """The tessdata directory holding every language asked for (and `osd`)."""
    wanted = [*languages.split("+"), "osd"]
    candidates = [configured] if configured else [os.environ.get("TESSDATA_PREFIX"), *TESSDATA_DIRS]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if all((path / f"{lang}.traineddata").is_file() for lang in wanted):
            return path
    where = configured or ", ".join(TESSDATA_DIRS)
    packages = " ".join(f"tesseract-ocr-{lang}" for lang in wanted)
    raise TessdataMissing(
        f"Tesseract language data for {'+'.join(wanted)} not found in {where}; "
        f"install the Debian packages {packages} (or set WATCHER_TESSDATA_DIR)"
    )


def model_description(languages: str = DEFAULT_LANGUAGES) -> str:
    try:
        release = version("tesserocr")
    except PackageNotFoundError:  # pragma: no cover - the dependency is mandatory
        release = "unknown"
    return f"tesseract (tesserocr {release}), languages {languages}, LSTM"


@dataclass
class Reading:
    blocks: list[Block]
    markdown: str
    confidence: float  # mean line confidence weighted by characters, 0-100

    @property
    def weight(self) -> float:
        return self.confidence * sum(len(b.text) for b in self.blocks)


class CpuReader:
    """One Tesseract instance; not thread-safe, so one per thread or process."""

    batch_pages = 1  # Tesseract reads one image per call; batching would only add latency

    def __init__(self, languages: str = DEFAULT_LANGUAGES, tessdata: str | None = None) -> None:
        import tesserocr  # native: loads libtesseract

        self._tesserocr = tesserocr
        path = str(find_tessdata(languages, tessdata))
        self.languages = languages
        self._path = path
        self._api = tesserocr.PyTessBaseAPI(path=path, lang=languages, psm=tesserocr.PSM.AUTO)
        self._osd = tesserocr.PyTessBaseAPI(path=path, lang="osd", psm=tesserocr.PSM.OSD_ONLY)
        self._scripts = {script_of(lang) for lang in languages.split("+")}
        self._other_readers: dict[str, Any] = {}

    def warm(self) -> None:
        check_warm_page(self.recognise(synthetic_page()))

    def recognise(self, page: RenderedPage) -> PageResult:
        found = self._detect(page.image)
        api, warning = self._reader_for(page.index, found)
        reading, rotation = self._upright(page.image, found, api)
        width, height = (page.height, page.width) if rotation in (90, 270) else (page.width, page.height)
        return PageResult(
            index=page.index,
            width=width,
            height=height,
            blocks=reading.blocks,
            markdown=reading.markdown,
            rotation=rotation,
            warnings=[warning] if warning else [],
        )

    def _upright(self, image: Image.Image, found: dict[str, Any] | None, api: Any) -> tuple[Reading, int]:
        """The page read upright, and the rotation (degrees counter-clockwise) that did it."""
        proposed, confidence = _orientation(found)
        if not proposed:
            return self._read(image, api), 0
        # PIL rotates counter-clockwise; OSD's angle is the one that rights the page.
        turned = self._read(image.rotate(proposed, expand=True), api)
        if confidence >= SURE_ORIENTATION_CONFIDENCE:
            return turned, proposed
        as_is = self._read(image, api)
        return (turned, proposed) if turned.weight >= as_is.weight else (as_is, 0)

    def _reader_for(self, index: int, found: dict[str, Any] | None) -> tuple[Any, dict[str, str] | None]:
        """The Tesseract to read the page with, and a warning when its script is not one
        of the configured languages'."""
        script = str((found or {}).get("script_name") or "")
        confidence = float((found or {}).get("script_conf") or 0.0)
        if (confidence < MIN_SCRIPT_CONFIDENCE or script in self._scripts
                or script not in READER_OF_SCRIPT):
            return self._api, None
        language = READER_OF_SCRIPT[script]
        reader = self._other_reader(language)
        said = (f"page {index + 1}: the page is written in {script} script, which "
                f"WATCHER_OCR_LANGUAGES={self.languages} does not cover; ")
        if reader is not None:
            said += (f"it was read with `{language}`; add it to WATCHER_OCR_LANGUAGES to read "
                     "such pages always")
        else:
            said += (f"its text below is unreliable. Install the Debian package {debian_package(language)} "
                     f"and add `{language}` to WATCHER_OCR_LANGUAGES")
        return reader or self._api, {"code": "language_not_covered", "message": said}

    def _other_reader(self, language: str) -> Any:
        if language not in self._other_readers:
            data = Path(self._path) / f"{language}.traineddata"
            self._other_readers[language] = (
                self._tesserocr.PyTessBaseAPI(path=self._path, lang=language, psm=self._tesserocr.PSM.AUTO)
                if data.is_file() else None)
        return self._other_readers[language]

    def recognise_pages(self, pages: list[RenderedPage]) -> list[PageResult]:
        return [self.recognise(page) for page in pages]

    def finish_document(self, pages: list[PageResult]) -> list[PageResult]:
        return pages

    def _detect(self, image: Image.Image) -> dict[str, Any] | None:
        """Tesseract's orientation and script detection on the page."""
        self._osd.SetImage(image)
        found: dict[str, Any] | None = self._osd.DetectOrientationScript()
        return found

    def _read(self, image: Image.Image, api: Any) -> Reading:
        tess = self._tesserocr
        api.SetImage(image)
        api.Recognize()
        blocks: list[Block] = []
        paragraph = -1
        iterator = api.GetIterator()
        for line in tess.iterate_level(iterator, tess.RIL.TEXTLINE):
            box = line.BoundingBox(tess.RIL.TEXTLINE)
            if box is None:
                continue  # an empty page yields one line without a box, and no text
            if line.IsAtBeginningOf(tess.RIL.PARA):
                paragraph += 1
            text = " ".join((line.GetUTF8Text(tess.RIL.TEXTLINE) or "").split())
            confidence = float(line.Confidence(tess.RIL.TEXTLINE))
            if not text or _is_noise(text, confidence):
                continue
            blocks.append(Block(
                type="text",
                bbox=[float(v) for v in box],
                text=text,
                score=round(confidence / 100.0, 4),
                order=len(blocks),
                extra={"paragraph": max(paragraph, 0)},
            ))
        pictures = self._pictures(api)
        api.Clear()
        page_script = _majority(" ".join(b.text for b in blocks))
        for block in blocks:
            block.text = settle_scripts(block.text, page_script)
        markdown, confidence = paragraphs_to_markdown(blocks), _mean_confidence(blocks)
        return Reading(with_figures(blocks, pictures), markdown, confidence)

    def _pictures(self, api: Any) -> list[Block]:
        """The regions Tesseract's layout analysis calls images, as figure blocks."""
        tess = self._tesserocr
        found = []
        for region in tess.iterate_level(api.GetIterator(), tess.RIL.BLOCK):
            box = region.BoundingBox(tess.RIL.BLOCK)
            if (box is not None and region.BlockType() in _IMAGE_BLOCKS
                    and min(box[2] - box[0], box[3] - box[1]) >= MIN_PICTURE_PIXELS):
                found.append(Block(type="image", bbox=[float(v) for v in box], text=""))
        return found


def _orientation(found: dict[str, Any] | None) -> tuple[int, float]:
    confidence = float(found.get("orient_conf", 0.0)) if found else 0.0
    if not found or confidence < MIN_ORIENTATION_CONFIDENCE:
        return 0, confidence
    return int(found.get("orient_deg", 0)) % 360, confidence


# Letters drawn alike in Latin and Cyrillic. Tesseract with two scripts loaded picks
# either for them, so "СССР" comes out Latin or "a" Cyrillic inside the other script's line.
_LATIN_TWINS = "ABCEHKMOPTXYaceopxy"
_CYRILLIC_TWINS = "АВСЕНКМОРТХУасеорху"
# Not twins, but what Tesseract mistakes for each other across the two scripts ("page"
# read as "раде"); used only for a word that is otherwise all twins, inside a line whose
# own letters clearly say which script it is in.
_LATIN_LOOKALIKES = "gunrm"
_CYRILLIC_LOOKALIKES = "дипгт"
_TO_CYRILLIC = str.maketrans(_LATIN_TWINS + _LATIN_LOOKALIKES, _CYRILLIC_TWINS + _CYRILLIC_LOOKALIKES)
_TO_LATIN = str.maketrans(_CYRILLIC_TWINS + _CYRILLIC_LOOKALIKES, _LATIN_TWINS + _LATIN_LOOKALIKES)
_TWINS = set(_LATIN_TWINS + _CYRILLIC_TWINS)
_LOOKALIKES = {"latin": set(_LATIN_LOOKALIKES), "cyrillic": set(_CYRILLIC_LOOKALIKES)}


def _script(ch: str) -> str | None:
    if ch in _TWINS or not ch.isalpha():
        return None
    if "\u0400" <= ch <= "\u04ff":
        return "cyrillic"
    return "latin" if ch.isascii() or "\u00c0" <= ch <= "\u024f" else None


def _majority(text: str) -> str | None:
    """The script of the letters that only one script has, if one clearly leads."""
    counts = {"cyrillic": 0, "latin": 0}
    for ch in text:
        script = _script(ch)
        if script:
            counts[script] += 1
    if counts["cyrillic"] > 2 * counts["latin"]:
        return "cyrillic"
    if counts["latin"] > 2 * counts["cyrillic"]:
        return "latin"
    return None


def settle_scripts(line: str, page_script: str | None) -> str:
    """Twin letters moved into the script around them: a word's own unambiguous letters
    decide, else its line's, else its page's."""
    line_script = _majority(line) or page_script
    words = []
    for word in line.split(" "):
        script = _majority(word) or (None if any(_script(c) for c in word) else line_script)
        if script and line_script and script != line_script and _misread(word, script):
            script = line_script
        if script == "cyrillic":
            word = word.translate(_TO_CYRILLIC)
        elif script == "latin":
            word = word.translate(_TO_LATIN)
        words.append(word)
    return " ".join(words)


def _misread(word: str, script: str) -> bool:
    """A word of twins and at most one look-alike: the other script's word, misread."""
    letters = [c for c in word if c.isalpha()]
    odd = [c for c in letters if c not in _TWINS]
    return len(letters) >= 3 and len(odd) <= 1 and all(c in _LOOKALIKES[script] for c in odd)


def _is_noise(text: str, confidence: float) -> bool:
    return not any(ch.isalnum() for ch in text) and confidence < MIN_SYMBOL_LINE_CONFIDENCE


def _mean_confidence(blocks: list[Block]) -> float:
    chars = sum(len(b.text) for b in blocks)
    if not chars:
        return 0.0
    return sum((b.score or 0.0) * 100.0 * len(b.text) for b in blocks) / chars


def paragraphs_to_markdown(blocks: list[Block]) -> str:
    """Lines in order; blocks with the same `paragraph` number share a paragraph."""
    paragraphs: list[list[str]] = []
    current: object = None
    for block in blocks:
        number = block.extra.get("paragraph")
        if not paragraphs or number != current:
            paragraphs.append([])
            current = number
        paragraphs[-1].append(block.text)
    return "\n\n".join("\n".join(lines) for lines in paragraphs)


class CpuEngine(Engine):
    """CpuReader on this process's threads: for tests and tools, not for the daemon."""

    name = "cpu"

    def __init__(self, concurrency: int = 1, languages: str = DEFAULT_LANGUAGES,
                 tessdata: str | None = None) -> None:
        super().__init__()
        self.model = model_description(languages)
        self.concurrency = concurrency
        self.languages = languages
        self.tessdata = tessdata
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ocr")
        self._local = threading.local()

    def _reader(self) -> CpuReader:
        reader: CpuReader | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = CpuReader(self.languages, self.tessdata)
            self._local.reader = reader
        return reader

    def _recognise_sync(self, page: RenderedPage) -> PageResult:
        return self._reader().recognise(page)

    async def recognise(self, page: RenderedPage) -> PageResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._recognise_sync, page)

    async def warm(self) -> None:
        page = synthetic_page()
        # One warm call per worker thread, so that no document pays for a model load.
        results = await asyncio.gather(*(self.recognise(page) for _ in range(self.concurrency)))
        check_warm_page(results[0])

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
