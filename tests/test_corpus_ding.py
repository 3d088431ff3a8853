"""Ding parsing, stable splits and the stable selection order."""

from __future__ import annotations

import pytest
from fixtures_corpus import DING_LINES, write_ding

from training.corpus.ding import DingFilter, clean_sentence, normalise_key, parse_ding_lines, read_ding
from training.corpus.errors import CorpusError
from training.corpus.offline import plan_corpus
from training.corpus.splits import SplitShares, split_of


def test_annotations_are_stripped_and_alternatives_aligned():
    pairs = parse_ding_lines(DING_LINES)
    got = {p.en: p.de for p in pairs}
    # ` | ` alternatives pair up one to one; `{...}`/`[...]` gone; typographic apostrophe made ASCII
    assert got["She's got new rimless reading glasses."] == "Sie hat eine neue randlose Lesebrille."
    assert got["Even in glasses she looks glamorous."] == "Selbst mit Brille sieht sie zauberhaft aus."
    assert got["You better go home."] == "Geh lieber nach Hause."
    # parenthesised glosses (with a '/' inside) removed, space before '?' closed
    assert got["Is all the luggage on board?"] == "Ist das ganze Gepäck eingeladen?"
    # ';' separates synonyms: the first of each side
    assert got["He was wide-eyed."] == "Er machte große Augen."
    assert got["I couldn't help laughing."] == "Ich musste lachen."


def test_what_is_not_kept():
    ens = [p.en for p in parse_ding_lines(DING_LINES)]
    assert not any("/" in e for e in ens)  # alternations ('gave/handed out', 'post / mail')
    assert "Oh yes!" not in ens  # 2 words < min_words
    assert not any(e.startswith("That is all") for e in ens)  # sides not aligned
    assert not any("eel" in e for e in ens)  # words, not sentences
    assert not any(e.startswith("It is a tree") for e in ens)  # 33 words > max_words
    assert ens.count("Bang goes the money.") == 1 and "Bang goes the money!" not in ens  # duplicate key
    assert "Show it to me." in ens and not any("sb." in e or e.startswith("as you") for e in ens)
    assert len(ens) == 8


def test_length_limits_are_configurable():
    ens = [p.en for p in parse_ding_lines(DING_LINES, DingFilter(min_words=2, max_words=40))]
    assert "Oh yes!" in ens and any(e.startswith("It is a tree") for e in ens)
    # both limits are inclusive: --min-words 4 --max-words 4 keeps the 4-word sentences, and only them
    fours = [p.en for p in parse_ding_lines(DING_LINES, DingFilter(min_words=4, max_words=4))]
    assert fours == ["I couldn't help laughing.", "You better go home.", "Show it to me.", "Bang goes the money."]


def test_a_semicolon_inside_an_annotation_does_not_split_synonyms():
    """``[Br.; Am.]`` is one annotation: the sentence is cut at the ';' between synonyms only."""
    line = "Wir fahren mit dem Zug. [Schw.; Ös.] :: We are going by train. [Br.; Am.]; We go by train."
    assert [(p.en, p.de) for p in parse_ding_lines([line])] == [("We are going by train.", "Wir fahren mit dem Zug.")]


def test_clean_sentence_and_key():
    assert clean_sentence("  Er kam  {vi} [ugs.] (endlich) nach  Hause . ") == "Er kam nach Hause."
    assert normalise_key("Don’t  WORRY!") == normalise_key("don't worry.") == "dont worry"


def test_read_ding_names_a_non_utf8_line(tmp_path):
    path = tmp_path / "de-en"
    path.write_bytes(b"Ich musste lachen. :: I couldn't help laughing.\n" + b"Gr\xfc\xdfe :: hi\n")
    with pytest.raises(CorpusError, match=r"de-en:2: not UTF-8"):
        read_ding(path)
    with pytest.raises(CorpusError, match="trans-de-en"):
        read_ding(tmp_path / "missing")


def _sentences(n: int) -> list[str]:
    return [f"Satz Nummer {i}. :: This is sentence number {i}." for i in range(n)]


def test_split_is_stable_when_lines_are_added():
    before = {p.en: split_of(p.key) for p in parse_ding_lines(_sentences(600))}
    more = _sentences(1500)
    more.insert(10, "Noch ein Satz hier. :: Yet another sentence here.")
    after = {p.en: split_of(p.key) for p in parse_ding_lines(list(reversed(more)))}
    assert all(after[en] == split for en, split in before.items())
    counts = {s: list(after.values()).count(s) for s in ("train", "dev", "test")}
    assert 0.05 < counts["test"] / len(after) < 0.09 and 0.015 < counts["dev"] / len(after) < 0.05


def test_split_shares_are_validated():
    with pytest.raises(ValueError):
        SplitShares(dev=0.5, test=0.5)


def test_bigger_max_utterances_is_a_superset_and_proportional():
    pairs = parse_ding_lines(_sentences(3000))
    small = {u.id for u in plan_corpus(pairs, 200)}
    big = plan_corpus(pairs, 1000)
    assert small < {u.id for u in big} and len(big) == 1000
    test_share = sum(u.split == "test" for u in big) / len(big)
    assert 0.04 < test_share < 0.10
    # the same sentence keeps its id and split whatever N is
    assert {u.id: u.split for u in plan_corpus(pairs)}.items() >= {u.id: u.split for u in big}.items()


@pytest.mark.real
def test_real_ding_file_counts():
    from training.corpus.sources import DING_SYSTEM_FILE

    if not DING_SYSTEM_FILE.is_file():
        pytest.skip("Debian trans-de-en is not installed (apt-get install trans-de-en)")
    pairs = read_ding(DING_SYSTEM_FILE)
    assert 15000 < len(pairs) < 20000
    assert sum(split_of(p.key) == "test" for p in pairs) >= 1000


def test_write_ding_fixture(tmp_path):
    assert len(read_ding(write_ding(tmp_path / "de-en"))) == 8


def test_negative_split_shares_are_refused():
    for dev, test in ((-0.1, 0.2), (0.1, -0.05)):
        with pytest.raises(ValueError, match="each >= 0"):
            SplitShares(dev=dev, test=test)


def test_an_utterance_id_is_the_same_in_every_version_so_a_rerun_finds_its_audio():
    """Audio files are named by id: an id scheme that changed would orphan every file of a built corpus."""
    (pair,) = parse_ding_lines(["Ich musste lachen. :: I couldn't help laughing."])
    (planned,) = plan_corpus([pair])
    assert planned.id == "ding-ef601f9419eb"


def test_the_plan_lists_sentences_in_the_order_of_the_ding_file():
    pairs = parse_ding_lines(_sentences(200))
    planned = plan_corpus(pairs, 50)
    lines = [u.pair.line for u in planned]
    assert lines == sorted(lines) and len(lines) == 50


@pytest.mark.parametrize("line", [
    "so wie du willst :: You better go home.",  # the German side is a fragment: no capital, no end
    "Herr Smith kam nach Hause :: Mr. Smith came home",  # neither side ends a sentence
])
def test_a_pair_is_kept_only_when_both_sides_are_whole_sentences(line):
    assert parse_ding_lines([line]) == []


def test_an_asset_folder_without_the_file_falls_back_to_the_system_ding_file(tmp_path, monkeypatch):
    from training.corpus import sources

    system = write_ding(tmp_path / "system-de-en")
    (tmp_path / "asset").mkdir()  # an asset folder that lacks de-en.txt (an interrupted `make assets`)
    monkeypatch.setattr(sources, "_asset_dir", lambda name: (tmp_path / "asset", ""))
    monkeypatch.setattr(sources, "DING_SYSTEM_FILE", system)
    assert sources.ding_file() == system


def test_a_piper_voice_without_its_json_config_is_missing_not_half_found(tmp_path, monkeypatch):
    from training.corpus import sources

    (tmp_path / "en_US-joe-medium.onnx").write_bytes(b"model")  # its .onnx.json is absent
    monkeypatch.setattr(sources, "_asset_dir", lambda name: (tmp_path, ""))
    monkeypatch.setattr(sources, "PIPER_PACKAGE", "no_such_piper_voice_package")  # nor is the package installed
    with pytest.raises(sources.AssetMissing, match="no Piper voice"):
        sources.piper_voice_files()
