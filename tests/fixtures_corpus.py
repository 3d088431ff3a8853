"""Small corpora written in the exact on-disk layouts of MuST-C, CoVoST 2 and the Ding dictionary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

DING_LINES = [
    "# Version :: devel 2023-01-30",
    "# Copyright (c) :: Frank Richter",
    "Aal {m} [cook.] | Aale {pl} :: eel | eels",
    "Brille {f} | Sie hat eine neue randlose Lesebrille. | Selbst mit Brille sieht sie zauberhaft aus. "
    ":: glasses; spectacles [formal] | She’s got new rimless reading glasses. | Even in glasses she looks glamorous.",
    "Ich musste lachen. :: I couldn't help laughing.",
    "Ist das ganze Gepäck eingeladen? :: Is all the luggage on board (the car/train/bus)?",
    "Er machte große Augen.; Seine Augen waren weit aufgerissen. :: He was wide-eyed.; His eyes were wide open.",
    "Der Lehrer teilte die Prüfungsarbeiten aus. :: The teacher gave/handed out the exam papers.",
    "Geh lieber nach Hause. | Doch! :: You better go home. | Oh yes!",
    "Das ist es. | Wirklich? :: That is all there is to it. ",  # alternatives not aligned: skipped
    "Der Scheck ist auf dem Postweg. :: The check is in the post [Br.] / mail. [Am.]",
    "jdm. etw. zeigen | Zeig es mir. | Er kam im Namen von jdm. :: to show sb. sth. | Show it to me. | He "
    "came on behalf of sb.",  # placeholders (sb., jdm.): templates, not sentences
    "so wie du willst, mein Freund! :: as you like it, my friend!",  # not a sentence start: a fragment
    "Futsch ist das Geld. :: Bang goes the money.",
    "Das Geld ist futsch! :: Bang goes the money!",  # the same English sentence: a duplicate
    "Es ist ein Baum mit sehr vielen Ästen und noch mehr Blättern und Zweigen überall. :: It is a tree with very "
    "many branches and even more leaves and twigs everywhere, and yet more of them and more and more and more "
    "until the end of the long summer.",
]


def tone(seconds: float, rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def fake_synthesizer(calls: list[str] | None = None):
    """A 'voice' that returns a tone as long as the text (20 ms per character) at 22,050 Hz."""

    def synthesize(text: str) -> tuple[np.ndarray, int]:
        if calls is not None:
            calls.append(text)
        return tone(0.02 * len(text), 22050), 22050

    return synthesize


def write_ding(path: Path, lines: list[str] = DING_LINES) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


MUSTC_SEGMENTS = [  # (talk, offset s, duration s, speaker, en, de)
    ("ted_1", 0.25, 1.0, "spk.1", "Thank you so much.", "Vielen Dank."),
    ("ted_1", 1.5, 1.25, "spk.1", "It is a great honour.", "Es ist mir eine große Ehre."),
    ("ted_2", 0.0, 0.5, "spk.2", "Hello.", "Hallo."),
    ("ted_2", 0.75, 1.0, "spk.2", "Good morning.", "Guten Morgen."),
]
MUSTC_TALKS = {"ted_1": (3.0, 16000), "ted_2": (2.0, 44100)}  # seconds, sample rate of each talk's wav


def write_mustc(root: Path, split: str = "dev", segments=MUSTC_SEGMENTS, talks=MUSTC_TALKS) -> Path:
    """root/en-de/data/<split>/{wav/*.wav, txt/<split>.{yaml,en,de}} as in a MuST-C v1 release."""
    data = root / "en-de" / "data" / split
    (data / "wav").mkdir(parents=True, exist_ok=True)
    (data / "txt").mkdir(parents=True, exist_ok=True)
    for talk, (seconds, rate) in talks.items():
        sf.write(data / "wav" / f"{talk}.wav", tone(seconds, rate), rate, subtype="PCM_16")
    yaml_lines = [f"- {{duration: {d}, offset: {o}, rw: 0.0, speaker_id: {s}, wav: {t}.wav}}"
                  for t, o, d, s, _, _ in segments]
    (data / "txt" / f"{split}.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    (data / "txt" / f"{split}.en").write_text("".join(f"{seg[4]}\n" for seg in segments), encoding="utf-8")
    (data / "txt" / f"{split}.de").write_text("".join(f"{seg[5]}\n" for seg in segments), encoding="utf-8")
    return data


COVOST_ROWS = [  # (clip, sentence, translation, client)
    ("common_voice_en_1.mp3", 'He said "yes".', 'Er sagte „ja“.', "client-a"),
    ("common_voice_en_2.mp3", "The weather is fine.", "Das Wetter ist schön.", "client-b"),
    ("common_voice_en_3.mp3", "Where is the station?", "Wo ist der Bahnhof?", "client-a"),
]
COVOST_HEADER = "path\tsentence\ttranslation\tclient_id"


def write_covost(root: Path, split: str = "dev", rows=COVOST_ROWS) -> tuple[Path, Path]:
    """root/covost_v2.en_de.<split>.tsv and root/cv/clips/*.mp3 (real MP3, 48 kHz mono, as Common Voice)."""
    clips = root / "cv" / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    for i, (clip, *_rest) in enumerate(rows):
        sf.write(clips / clip, tone(1.0 + 0.25 * i, 48000), 48000, format="MP3")
    tsv = root / f"covost_v2.en_de.{split}.tsv"
    tsv.write_text(COVOST_HEADER + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return tsv, clips


def corrupt_mp3(path: Path) -> None:
    """Keep the header, replace the second half by zeros: the header reads, the decoder gives up."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\0" * 50000)
