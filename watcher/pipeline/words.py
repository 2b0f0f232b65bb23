"""Whether a page's text reads as words of the configured languages.

A text layer can be made of ordinary characters and still be garbage: an old OCR that did
not know Russian leaves `Hanorosas:t AeKnapai` for «Налоговая декларация», and a font
whose glyphs are mapped to the wrong code points gives Latin letters where Cyrillic ones
are drawn. Both are told by their words: few of them are words of any language the
collection is in. The word lists are `wordfreq`'s (the frequencies of words in large
corpora of each language; a word it has never seen has frequency 0). It is a maintained
package with Russian, Ukrainian, English and 40 other languages in one install and no
native code, where hunspell's dictionaries would need a native binding and its affix
rules for Russian inflection; a word list from corpora also knows names, abbreviations
and inflected forms (`ГОСТ`, `декларации`) that a spelling dictionary may not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Tesseract's language codes (WATCHER_OCR_LANGUAGES) to wordfreq's.
WORDFREQ_LANGUAGES = {
    "rus": "ru", "eng": "en", "ukr": "uk", "bel": "ru", "bul": "bg", "srp": "sr", "mkd": "mk",
    "deu": "de", "fra": "fr", "spa": "es", "ita": "it", "por": "pt", "nld": "nl", "pol": "pl",
    "ces": "cs", "slk": "sk", "slv": "sl", "hrv": "hr", "ron": "ro", "hun": "hu", "fin": "fi",
    "swe": "sv", "dan": "da", "nor": "nb", "lav": "lv", "lit": "lt", "tur": "tr", "ell": "el",
    "heb": "he", "ara": "ar", "fas": "fa", "hin": "hi", "vie": "vi", "ind": "id", "msa": "ms",
    "cat": "ca", "isl": "is",
}
# Letters only, three or more: shorter tokens are words in every language by chance.
_WORD = re.compile(r"[^\W\d_]{3,}")
_CYRILLIC = re.compile(r"[\u0400-\u04FF]")
_LATIN = re.compile(r"[A-Za-z]")
# Enough words for a stable share; a page holds a few hundred.
SAMPLE_WORDS = 400


@dataclass(frozen=True)
class WordScore:
    words: int
    known: float  # share of the words that are words of a configured language
    mixed: float  # share of the words that mix Latin and Cyrillic letters

    def percent(self) -> str:
        return f"{round(100 * self.known)} %"


def languages(ocr_languages: str) -> tuple[str, ...]:
    """wordfreq's codes for WATCHER_OCR_LANGUAGES (`rus+eng` -> ru, en); unknown ones left out."""
    codes = [WORDFREQ_LANGUAGES.get(code) for code in ocr_languages.split("+")]
    return tuple(dict.fromkeys(code for code in codes if code))


def score(text: str, langs: tuple[str, ...]) -> WordScore:
    words = _WORD.findall(text)[:SAMPLE_WORDS]
    if not words:
        return WordScore(0, 0.0, 0.0)
    known = sum(_known(word.lower(), langs) for word in words)
    mixed = sum(bool(_CYRILLIC.search(w)) and bool(_LATIN.search(w)) for w in words)
    return WordScore(len(words), known / len(words), mixed / len(words))


@lru_cache(maxsize=65536)
def _known(word: str, langs: tuple[str, ...]) -> bool:
    from wordfreq import zipf_frequency  # loads its lists on first use: in a worker thread

    if _CYRILLIC.search(word) and _LATIN.search(word):
        return False  # a look-alike mix is no word in any language, whatever a corpus says
    return any(zipf_frequency(word, lang) > 0 for lang in langs)
