"""Rule-based report texts for the image-text stage, their vocabulary and the bank of training texts.

:func:`pair_table` writes one short text per image by rule (synthetic shoulders from the generator's parameters,
NIH images from label and boxes; see :mod:`osteolib.stages.image_text` for the rules and why), and records which
words carry the class. :class:`Vocabulary` and :class:`TextBank` are built from the *training* texts only.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from osteolib.data import synthetic

__all__ = [
    "PAD", "UNK", "SYNTHETIC_SHOULDER", "CORTEX_WORDS", "TRABECULAE_WORDS", "SIDE_WORDS", "ZONES", "PairTexts",
    "ShoulderTextRule", "shoulder_texts", "nih_text", "nih_texts", "pair_table", "report_texts", "tokenize", "Vocabulary", "TextBank",
]

PAD, UNK = "<pad>", "<unk>"
SYNTHETIC_SHOULDER = synthetic.SHOULDER_SOURCE
# Words by level, healthy first; two classes use the ends. Beyond three classes the rule would need new words.
CORTEX_WORDS = ("thick", "thinned", "thin")
TRABECULAE_WORDS = ("dense", "rarefied", "sparse")
SIDE_WORDS = {"R": "right", "L": "left"}
ZONES = ("upper", "middle", "lower")


# --------------------------------------------------------------------------------------------------
# 1 · Texts by rule
# --------------------------------------------------------------------------------------------------

def _readable(name: str) -> str:
    return str(name).replace("_", " ").strip().lower()


@dataclass
class PairTexts:
    """One text per image: ``table`` has image_id, split, label, text; ``generating_words`` are the words a rule
    emitted *because of the class* (class names and class-dependent findings)."""

    table: pd.DataFrame
    generating_words: frozenset[str]
    rule: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShoulderTextRule:
    """Thresholds turning ``cti`` and ``trabecular_density`` into words (one cut between adjacent classes)."""

    classes: tuple[str, ...]
    cti_cuts: tuple[float, ...]  # decreasing: healthy classes have the thicker cortex
    density_cuts: tuple[float, ...]
    include_class_name: bool = True

    @classmethod
    def from_generator(cls, classes: Sequence[str], difficulty: float, n_draws: int = 2000, seed: int = 0,
                       include_class_name: bool = True) -> "ShoulderTextRule":
        """Cuts half-way between the class-conditional medians, drawn from the generator's own patient model."""
        classes = tuple(classes)
        if not 2 <= len(classes) <= len(CORTEX_WORDS):
            raise ValueError(f"the shoulder text rule has words for 2 or 3 classes; got classes {classes}")
        rng = np.random.default_rng(seed)
        medians = {name: [] for name in ("cti", "trabecular_density")}
        for label in classes:
            draws = [synthetic.draw_shoulder_patient(rng, label, difficulty, classes) for _ in range(n_draws)]
            medians["cti"].append(float(np.median([d.cti for d in draws])))
            medians["trabecular_density"].append(float(np.median([d.trabecular_density for d in draws])))

        def cuts(values: list[float]) -> tuple[float, ...]:
            return tuple((a + b) / 2 for a, b in zip(values[:-1], values[1:]))

        return cls(classes, cuts(medians["cti"]), cuts(medians["trabecular_density"]), include_class_name)

    def _words(self, levels: tuple[str, ...]) -> tuple[str, ...]:
        return (levels[0], levels[-1]) if len(self.classes) == 2 else levels

    def level(self, value: float, cuts: tuple[float, ...]) -> int:
        """0 = healthiest word ... len(classes) - 1 = most severe (cuts decrease)."""
        return int(sum(value < cut for cut in cuts))

    def text(self, label: str, cti: float, trabecular_density: float, side: str, view: str) -> str:
        cortex = self._words(CORTEX_WORDS)[self.level(cti, self.cti_cuts)]
        trabeculae = self._words(TRABECULAE_WORDS)[self.level(trabecular_density, self.density_cuts)]
        if side not in SIDE_WORDS:
            raise ValueError(f"side must be 'R' or 'L' (parameters.csv column 'side'); got {side!r}")
        parts = [f"{cortex} cortex", f"{trabeculae} trabeculae", f"{SIDE_WORDS[side]} humerus", f"{view.lower()} view"]
        return ", ".join(([_readable(label)] if self.include_class_name else []) + parts)

    def generating_words(self) -> frozenset[str]:
        words = set(self._words(CORTEX_WORDS)) | set(self._words(TRABECULAE_WORDS))
        if self.include_class_name:
            words |= {w for c in self.classes for w in tokenize(_readable(c))}
        return frozenset(words)


def shoulder_texts(manifest: pd.DataFrame, parameters: pd.DataFrame, rule: ShoulderTextRule) -> PairTexts:
    """Texts of synthetic shoulder images from their generating parameters (rows matched by image_id)."""
    needed = ["image_id", "cti", "trabecular_density", "side", "view"]
    missing = [c for c in needed if c not in parameters.columns]
    if missing:
        raise ValueError(f"parameters.csv lacks column(s) {missing}: regenerate the synthetic shoulders "
                         f"(osteolib.data.synthetic.ensure_synthetic)")
    by_id = parameters.set_index("image_id")
    absent = [i for i in manifest["image_id"] if i not in by_id.index]
    if absent:
        raise ValueError(f"{len(absent)} manifest images have no row in parameters.csv (first: {absent[:5]}); "
                         f"the manifest and the synthetic data set do not belong together")
    texts = [rule.text(label, float(by_id.at[i, "cti"]), float(by_id.at[i, "trabecular_density"]),
                       str(by_id.at[i, "side"]), str(by_id.at[i, "view"]))
             for i, label in zip(manifest["image_id"], manifest["label"])]
    table = manifest[["image_id", "split", "label"]].assign(text=texts).reset_index(drop=True)
    return PairTexts(table, rule.generating_words(), {"kind": "shoulder", **asdict(rule)})


def nih_text(label: str, boxes: list[dict] | None, width: float, height: float) -> str:
    """"pneumonia, pneumonia in right lower zone": class, then each box's finding and coarse location.

    Radiographs are displayed with the patient's right on the image's left, so a box centred in the left half of
    the image lies in the patient's *right* lung. Zones are thirds of the image height.
    """
    parts = [_readable(label)]
    for box in boxes or []:
        cx, cy = (box["x"] + box["w"] / 2) / width, (box["y"] + box["h"] / 2) / height
        side = "right" if cx < 0.5 else "left"
        zone = ZONES[min(int(cy * 3), 2)]
        parts.append(f"{_readable(box.get('label') or label)} in {side} {zone} zone")
    return ", ".join(parts)


def nih_texts(manifest: pd.DataFrame) -> PairTexts:
    """Texts of NIH images from label and boxes (boxes in the manifest's pixels of width x height)."""
    for column in ("boxes", "width", "height"):
        if column not in manifest.columns:
            raise ValueError(f"manifest lacks column {column!r}; build it with osteolib.data.manifest.nih_cxr14")
    texts = [nih_text(label, boxes, float(w), float(h)) for label, boxes, w, h in
             zip(manifest["label"], manifest["boxes"], manifest["width"], manifest["height"])]
    table = manifest[["image_id", "split", "label"]].assign(text=texts).reset_index(drop=True)
    words = frozenset(w for label in manifest["label"].unique() for w in tokenize(_readable(label)))
    return PairTexts(table, words, {"kind": "nih", "sides": "patient's", "zones": list(ZONES)})


def pair_table(manifest: pd.DataFrame, include_class_name: bool = True, text_column: str | None = None) -> PairTexts:
    """Texts for every manifest row: synthetic shoulders from parameters.csv beside their images; any other data
    (NIH, your own X-rays) from label and expert boxes (:func:`nih_text`); or, with ``text_column``, the reports
    a label table brought (:func:`report_texts`)."""
    if text_column is not None:
        return report_texts(manifest, text_column)
    sources = set(manifest["source"].astype(str))
    if sources == {SYNTHETIC_SHOULDER}:
        folder = Path(manifest["path"].iloc[0]).parent.parent
        parameters_csv, generator_json = folder / "parameters.csv", folder / "generator.json"
        for path in (parameters_csv, generator_json):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the synthetic shoulder texts are written from the "
                                        f"generator's files beside images/; regenerate the data set")
        settings = json.loads(generator_json.read_text())["parameters"]
        rule = ShoulderTextRule.from_generator(settings["classes"], settings["difficulty"],
                                               include_class_name=include_class_name)
        return shoulder_texts(manifest, pd.read_csv(parameters_csv), rule)
    if SYNTHETIC_SHOULDER in sources:
        raise ValueError(f"manifest mixes synthetic shoulders with {sorted(sources - {SYNTHETIC_SHOULDER})}; "
                         f"texts are written per data set")
    return nih_texts(manifest)


def report_texts(manifest: pd.DataFrame, text_column: str) -> PairTexts:
    """Each image's own report from the manifest column ``text_column`` (a label table's extra column, kept by the
    csv spec). Which words carry the class is unknown in free text: the generating words are the class names."""
    if text_column not in manifest.columns:
        raise ValueError(f"text_column={text_column!r} is not a manifest column (columns: {list(manifest.columns)}); "
                         "name the label table's report column, or set text_column: null for texts by rule")
    texts = manifest[text_column].fillna("").astype(str).str.strip()
    empty = manifest.loc[texts == "", "image_id"].astype(str).tolist()
    if empty:
        raise ValueError(f"{len(empty)} image(s) have no text in column {text_column!r}, e.g. {empty[:5]}: give "
                         "every image a report, or set text_column: null for texts by rule")
    table = manifest[["image_id", "split", "label"]].assign(text=texts.to_numpy()).reset_index(drop=True)
    words = frozenset(w for label in manifest["label"].unique() for w in tokenize(_readable(label)))
    return PairTexts(table, words, {"kind": "reports", "column": text_column})


# --------------------------------------------------------------------------------------------------
# Vocabulary and the bank of training texts
# --------------------------------------------------------------------------------------------------

def tokenize(text: str) -> list[str]:
    """Lower-case words; commas separate phrases but are not words."""
    return re.findall(r"[a-z0-9]+", str(text).lower())


@dataclass(frozen=True)
class Vocabulary:
    """Words seen in the *training* texts; index 0 is padding, 1 an unknown word."""

    words: tuple[str, ...]

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "Vocabulary":
        return cls((PAD, UNK, *sorted({w for t in texts for w in tokenize(t)})))

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, texts: Sequence[str], length: int | None = None) -> torch.Tensor:
        """(N, length) token ids, padded with 0; length None: the longest text."""
        index = self.index
        ids = [[index.get(w, 1) for w in tokenize(t)] for t in texts]
        length = length or max(1, max(len(i) for i in ids))
        out = torch.zeros((len(ids), length), dtype=torch.long)
        for row, sequence in enumerate(ids):
            out[row, :min(len(sequence), length)] = torch.tensor(sequence[:length], dtype=torch.long)
        return out

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [self.words[int(t)] for t in tokens if int(t) != 0]


@dataclass(frozen=True)
class TextBank:
    """The distinct texts of the training split: the only texts a model may show for a val or test image."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]

    @classmethod
    def from_train_rows(cls, rows: pd.DataFrame) -> "TextBank":
        not_train = rows[rows["split"].astype(str) != "train"]
        if len(not_train):
            raise ValueError(f"the text bank takes training rows only; got {len(not_train)} rows of split(s) "
                             f"{sorted(set(not_train['split']))} "
                             f"(first image_ids: {not_train['image_id'].tolist()[:5]})")
        distinct = rows.drop_duplicates("text")
        return cls(tuple(distinct["text"]), tuple(distinct["label"]))
