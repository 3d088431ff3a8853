"""The Ding dictionary (Debian ``trans-de-en``, ``/usr/share/trans/de-en``) as English-German sentence pairs.

A line reads ``German :: English``. Each side lists alternatives separated by `` | ``, aligned one to one
between the sides; inside an alternative, ``;`` separates synonyms. ``{f}``, ``[coll.]`` and ``<fuller>`` are
annotations. Most alternatives are words and phrases; some are example sentences, which are what we keep:

- the first synonym of each aligned alternative, annotations removed, parenthesised optional words and
  glosses removed (``Is all the luggage on board (the car/train)?`` -> ``Is all the luggage on board?``),
  typographic apostrophes made ASCII, whitespace collapsed;
- only when both sides start with a capital, a digit or a quote, end in ``.``, ``?`` or ``!``, and neither
  holds a ``/`` alternation (``gave/handed out``), an ellipsis or a placeholder (``sth.``, ``jdm.``);
- only when the English side has ``min_words..max_words`` words;
- each English sentence once (the first occurrence in the file, compared by ``normalise_key``).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import CorpusError

COMMENT = "#"
SIDES = " :: "
ALTERNATIVES = " | "
SYNONYMS = ";"
SENTENCE_END = ".?!"
ANNOTATION = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>")
PARENTHESISED = re.compile(r"\([^()]*\)")
SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,?!;:])")
REJECT = ("/", "…", "...")  # alternations and elisions: not one sentence a speaker would say
PLACEHOLDER = re.compile(r"\b(sth|sb|etw|jd|jdm|jdn|jds)\.")  # "on behalf of sb.": a template, not a sentence
SENTENCE_START = "'\"„‚“‘¿¡("  # besides a capital letter or a digit
APOSTROPHES = str.maketrans({"’": "'", "‘": "'"})


@dataclass(frozen=True)
class DingFilter:
    """Which sentence pairs to keep; lengths are English words."""

    min_words: int = 3
    max_words: int = 30


@dataclass(frozen=True)
class SentencePair:
    en: str
    de: str
    line: int  # 1-based line of the Ding file it came from

    @property
    def key(self) -> str:
        return normalise_key(self.en)


def normalise_key(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form of a sentence (dedup and split hashing)."""
    text = unicodedata.normalize("NFKC", text).translate(APOSTROPHES).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in text if c != "'").split())


def clean_sentence(text: str) -> str:
    """One synonym of one alternative -> a plain sentence (maybe empty)."""
    text = ANNOTATION.sub(" ", text)
    while PARENTHESISED.search(text):  # innermost first: "(a (b) c)"
        text = PARENTHESISED.sub(" ", text)
    text = " ".join(text.translate(APOSTROPHES).split())
    return SPACE_BEFORE_PUNCT.sub(r"\1", text)


def _is_sentence(text: str) -> bool:
    return (
        bool(text)
        and text[-1] in SENTENCE_END
        and (text[0].isupper() or text[0].isdigit() or text[0] in SENTENCE_START)
        and not any(r in text for r in REJECT)
        and not PLACEHOLDER.search(text)
    )


def sentence_pairs_in_line(line: str) -> Iterator[tuple[str, str]]:
    """(en, de) candidate sentence pairs of one Ding line, before length limits and deduplication."""
    line = line.strip()
    if not line or line.startswith(COMMENT) or SIDES not in line:
        return
    german, english = line.split(SIDES, 1)
    de_alternatives, en_alternatives = german.split(ALTERNATIVES), english.split(ALTERNATIVES)
    if len(de_alternatives) != len(en_alternatives):
        return  # not aligned: no way to tell which German goes with which English
    for de_alt, en_alt in zip(de_alternatives, en_alternatives, strict=True):
        if not any(end in en_alt for end in SENTENCE_END):
            continue  # a word or phrase: most alternatives; skip the cleaning
        # annotations and glosses may hold ';' ("[Br.; Am.]"): clean before splitting synonyms
        en = clean_sentence(en_alt).split(SYNONYMS)[0].strip()
        if not _is_sentence(en):
            continue
        de = clean_sentence(de_alt).split(SYNONYMS)[0].strip()
        if _is_sentence(de):
            yield en, de


def parse_ding_lines(lines: Iterator[str] | list[str], filt: DingFilter = DingFilter()) -> list[SentencePair]:
    """Sentence pairs of Ding lines (line numbers count from 1), filtered and deduplicated, in file order."""
    seen: set[str] = set()
    pairs = []
    for number, line in enumerate(lines, start=1):
        for en, de in sentence_pairs_in_line(line):
            if not filt.min_words <= len(en.split()) <= filt.max_words:
                continue
            pair = SentencePair(en=en, de=de, line=number)
            if not pair.key or pair.key in seen:
                continue
            seen.add(pair.key)
            pairs.append(pair)
    return pairs


def read_ding(path: str | os.PathLike, filt: DingFilter = DingFilter()) -> list[SentencePair]:
    """Read the Ding file; ``CorpusError`` naming the line when it is not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(
            path,
            None,
            "no such file; install the Debian package trans-de-en (apt-get install "
            "trans-de-en) or pass the file with --ding",
        )
    lines = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise CorpusError(path, number, "not UTF-8; the Ding file is UTF-8 since version 1.8") from None
    if not any(line.strip() for line in lines):
        raise CorpusError(path, None, "empty file; expected the Ding dictionary's `German :: English` lines")
    pairs = parse_ding_lines(lines, filt)
    if not pairs:
        raise CorpusError(
            path,
            None,
            f"no sentence pairs with {filt.min_words}..{filt.max_words} English words in {len(lines)} lines; "
            "is this the Ding file (`German :: English` lines)? (--min-words/--max-words set the range)",
        )
    return pairs
