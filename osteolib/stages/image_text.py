"""Image-text explanations: rule-based report texts, an image-text model with a consistency loss, and
explanations in both modalities.

Following related work on retinal OCT (short rule-based texts "<class>, <finding 1>, <finding 2>", an image head
and a text head trained with ``L = 1/3 (CE(y_img, y) + CE(y_txt, y) + CE(y_img, y_txt))``), this module

1. **writes a text for every image by rule** (:func:`pair_table`). Synthetic shoulders: from the generating
   parameters in the data set's ``parameters.csv`` (:class:`ShoulderTextRule`): "osteoporosis, thin cortex,
   sparse trabeculae, left humerus, ap view". The cortex and trabecular words come from thresholds on ``cti`` and
   ``trabecular_density`` placed half-way between the class-conditional medians of those parameters, measured by
   drawing patients from the generator itself (:func:`osteolib.data.synthetic.draw_shoulder_patient`), so no constant
   of the generator is copied here. So the words that carry the class (class name, cortex and trabecular
   adjectives: :attr:`PairTexts.generating_words`) and those that do not (side, view, "cortex", "humerus") are
   known. NIH: from the label and the radiologist boxes (:func:`nih_text`): finding name and a coarse location
   (side of the *patient*, whose right is on the image's left; upper / middle / lower third); images without a box
   get the class name only ("pneumonia" or "no finding").
2. **trains an image-text model** (:class:`ImageTextModel`): the image encoder is a study backbone initialised from
   a pretraining checkpoint through :func:`osteolib.stages.finetune.build_model` (the checked loader; a missing checkpoint
   raises), the text encoder a bag of word embeddings (mean pooled) learned from scratch on the project's tiny
   vocabulary. Stage 1 aligns the two CLIP-style (:func:`contrastive_loss`; texts repeat, so every pair with the
   same text counts as a positive); stage 2 trains the image head (the backbone's own classifier) and the text
   head with :func:`consistency_loss`. Both stages, and the image-only baseline, go through
   :func:`osteolib.engine.loop`: batches are ``(image, tokens, target)`` so fastai passes ``(image, tokens)`` to
   the model.
3. **never reads a test text.** Outside stage-1 training the text side is the text *retrieved* from a bank of
   training texts (:class:`TextBank`, which refuses rows of any other split) by cosine similarity of the aligned
   embeddings; :func:`predict` takes images only. Validation in stage 2 uses retrieval too, so its loss measures
   what the test will see.
4. **explains both modalities**: Grad-CAM on the image head via :func:`osteolib.explain.compute_cams` (the image
   head *is* the backbone, so the study's target layers apply unchanged), and word attributions on the text head
   by gradient x input on the token embeddings (:func:`word_attributions`; captum is not installed and the rule
   is three lines). With a mean-pooled bag of words and a linear head, gradient x input is the exact share of
   each word in the logit (against an all-zero embedding), so the test can check that the class-carrying words
   rank first.

Decisions: no horizontal flips (a flip would contradict the "left / right" words), no augmentation at all (both
models see the same pixels; the runs are short); the consistency term uses the text head's prediction as a
*detached* soft target, so it teaches the image head and does not pull the text head towards the image head;
the final weights of each stage are used (no selection, so nothing is chosen on any split); the baseline gets as
many epochs as both stages together and the image encoder's learning rate. The text side is new and tiny, so it
learns ``text_lr_scale`` times faster than the pretrained image encoder (timm's layer-wise lr groups with the image
encoder as the lowest group, :meth:`ImageTextModel.group_matcher`): at the image encoder's rate its embeddings
barely leave their initialisation in a short run.

Layout: the rule texts, the vocabulary and the text bank (1) live in :mod:`osteolib.stages.image_text_reports` and
are reachable from here; the model, training, prediction, attributions, tables and figures (2-4) are this module.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from torch import nn
from torch.utils.data import Dataset

from osteolib.stages import finetune
from osteolib.evaluation import stats
from osteolib.data import SeededLoader, SeededSampler, XrayDataset, make_dataloaders
from osteolib.utils import eval_mode
from osteolib.study import SCENARIOS
from osteolib.engine import TrainConfig, fit
from osteolib.data import crop_policy
# The constants are imported so that they stay reachable here, as before the split.
from osteolib.stages.image_text_reports import (
    CORTEX_WORDS,
    PAD,
    SIDE_WORDS,
    SYNTHETIC_SHOULDER,
    TRABECULAE_WORDS,
    UNK,
    ZONES,
    PairTexts,
    ShoulderTextRule,
    TextBank,
    Vocabulary,
    nih_text,
    nih_texts,
    pair_table,
    report_texts,
    shoulder_texts,
    tokenize,
)

__all__ = [
    "PAD", "UNK", "PairTexts", "ShoulderTextRule", "shoulder_texts", "nih_text", "nih_texts", "pair_table", "report_texts",
    "tokenize", "Vocabulary", "TextBank", "BagOfWordsEncoder", "ImageTextModel", "contrastive_loss",
    "consistency_loss", "PairDataset", "make_pair_dataloaders", "MultimodalConfig", "MultimodalResult",
    "default_out_name", "train_image_text", "train_image_baseline", "predict", "predict_baseline",
    "word_attributions", "top_word_is_generating", "attribution_summary", "predicted_classes", "metrics_table",
    "mcnemar_table", "highlighted_text", "explanation_figure", "training_curves_figure",
]


# --------------------------------------------------------------------------------------------------
# 2 · The model and its losses
# --------------------------------------------------------------------------------------------------

class BagOfWordsEncoder(nn.Module):
    """Token embeddings, mean-pooled over the words of a text (padding ignored)."""

    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        # Small init: a word that never helps (one in every text) then stays near zero and gets no attribution.
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def pool(self, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        present = (tokens != 0).unsqueeze(-1).to(embedded.dtype)
        return (embedded * present).sum(1) / present.sum(1).clamp(min=1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pool(self.embedding(tokens), tokens)


def contrastive_loss(image_embedding: torch.Tensor, text_embedding: torch.Tensor, tokens: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every pair with the same text is a positive (the rule texts repeat)."""
    image_embedding = F.normalize(image_embedding.float(), dim=-1)
    text_embedding = F.normalize(text_embedding.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_embedding @ text_embedding.T
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (finetune.soft_cross_entropy(logits, target) + finetune.soft_cross_entropy(logits.T, target))


def consistency_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1/3 (CE(y_img, y) + CE(y_txt, y) + CE(y_img, softmax(y_txt)))`` on ``pred`` = (N, 2, C) stacked heads.

    The text head's probabilities are a detached soft target: the third term teaches the image head.
    """
    image_logits, text_logits = pred[:, 0].float(), pred[:, 1].float()
    soft = torch.softmax(text_logits.detach(), dim=-1)
    return (F.cross_entropy(image_logits, target) + F.cross_entropy(text_logits, target)
            + finetune.soft_cross_entropy(image_logits, soft)) / 3.0


class ImageTextModel(nn.Module):
    """Image encoder (a study backbone whose classifier is the image head) + bag-of-words text encoder + text head.

    ``stage`` "align": ``forward(images, tokens)`` returns the contrastive loss. ``stage`` "heads": returns the
    stacked logits (N, 2, C) of image and text head; in training on the given tokens, in eval mode on the texts
    retrieved from the bank (the tokens passed are then ignored).
    """

    def __init__(self, image_encoder: nn.Module, vocabulary: Vocabulary, bank: TextBank, num_classes: int,
                 text_dim: int = 64, joint_dim: int = 64):
        super().__init__()
        self.image_encoder = image_encoder
        self.vocabulary = vocabulary
        self.bank = bank
        self.text_encoder = BagOfWordsEncoder(len(vocabulary.words), text_dim)
        self.text_head = nn.Linear(text_dim, num_classes)
        self.image_projection = nn.Linear(image_encoder.num_features, joint_dim)
        self.text_projection = nn.Linear(text_dim, joint_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.register_buffer("bank_tokens", vocabulary.encode(bank.texts), persistent=True)
        self.stage = "align"

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """For timm's layer-wise lr groups (``TrainConfig.layer_decay``): the pretrained image encoder is the lowest
        group, everything new (text side, projections) the top one, so ``layer_decay`` is the image encoder's lr
        relative to the text side's (see :meth:`MultimodalConfig.train_config`)."""
        return {"stem": r"^image_encoder\."}

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.forward_head(self.image_encoder.forward_features(images), pre_logits=True)

    def retrieve(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index into the bank of the most similar training text, and that similarity, per image."""
        image_embedding = F.normalize(self.image_projection(features).float(), dim=-1)
        bank_embedding = F.normalize(self.text_projection(self.text_encoder(self.bank_tokens)).float(), dim=-1)
        similarity = image_embedding @ bank_embedding.T
        best = similarity.max(dim=1)
        return best.indices, best.values

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        features = self.image_features(images)
        if self.stage == "align":
            if tokens is None:
                raise ValueError("the alignment stage needs each image's own text tokens")
            return contrastive_loss(self.image_projection(features), self.text_projection(self.text_encoder(tokens)),
                                    tokens, self.logit_scale)
        if tokens is None or not self.training:
            tokens = self.bank_tokens[self.retrieve(features)[0]]
        image_logits = self.image_encoder.get_classifier()(features)
        text_logits = self.text_head(self.text_encoder(tokens))
        return torch.stack([image_logits, text_logits.to(image_logits.dtype)], dim=1)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

class PairDataset(Dataset):
    """``(image, tokens, target)`` items: an :class:`~osteolib.data.XrayDataset` plus one token row per image."""

    def __init__(self, images: XrayDataset, tokens: torch.Tensor):
        if len(tokens) != len(images):
            raise ValueError(f"{len(tokens)} token rows for {len(images)} images; they must pair up one to one")
        self.images, self.tokens = images, tokens

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, target = self.images[key]
        index = key[0] if isinstance(key, tuple) else key
        return image, self.tokens[int(index)], target


def make_pair_dataloaders(cache: Any, train: pd.DataFrame, valid: pd.DataFrame, vocabulary: Vocabulary,
                          classes: Sequence[str], image_size: int, batch_size: int, mean: float, std: float,
                          seed: int = 0) -> DataLoaders:
    """Seeded loaders of (image, tokens, target); the training one shuffles and drops a last batch of one."""
    lookup = {c: i for i, c in enumerate(classes)}
    length = max(len(tokenize(t)) for t in pd.concat([train["text"], valid["text"]]))
    loaders = []
    for i, (rows, shuffle) in enumerate(((train, True), (valid, False))):
        images = XrayDataset(cache, rows["image_id"].tolist(), [lookup[label] for label in rows["label"]],
                             crop_policy("none", image_size), mean=mean, std=std)
        dataset = PairDataset(images, vocabulary.encode(rows["text"].tolist(), length))
        generator = torch.Generator().manual_seed(seed + i)
        drop_last = shuffle and len(dataset) % batch_size == 1
        loaders.append(SeededLoader(dataset, batch_size=batch_size, drop_last=drop_last, generator=generator,
                                    sampler=SeededSampler(len(dataset), shuffle, generator)))
    return DataLoaders(*loaders, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

@dataclass
class MultimodalConfig:
    """One image-text run (and its baseline)."""

    scenario: str = "chest_mae"
    backbone: str = "densenet121"
    image_size: int = 128
    align_epochs: int = 2
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-4  # peak lr of the image encoder (and of the whole baseline)
    text_lr_scale: float = 10.0  # the new text side (embeddings, heads' projections) learns this much faster
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    text_dim: int = 64
    joint_dim: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.scenario not in SCENARIOS or self.scenario == "random":
            problems.append(f"scenario={self.scenario!r}: the image encoder starts from a pretraining checkpoint; "
                            f"choose one of {[s for s in SCENARIOS if s != 'random']}")
        if self.backbone not in ("densenet121", "vit_small"):
            problems.append(f"backbone={self.backbone!r}: choose 'densenet121' or 'vit_small'")
        for name in ("align_epochs", "epochs", "batch_size", "text_dim", "joint_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (2 if name == "batch_size" else 1):
                problems.append(f"{name} must be an int >= {2 if name == 'batch_size' else 1} (got {value!r})")
        if not (isinstance(self.text_lr_scale, (int, float)) and self.text_lr_scale >= 1):
            problems.append(f"text_lr_scale must be a number >= 1 (got {self.text_lr_scale!r})")
        if problems:
            raise ValueError("invalid MultimodalConfig: " + "; ".join(problems))

    def finetune_config(self) -> finetune.FinetuneConfig:
        """For :func:`osteolib.stages.finetune.build_model`: the same checked encoder initialisation as fine-tuning."""
        return finetune.FinetuneConfig(self.scenario, self.backbone, image_size=self.image_size, epochs=1,
                                       batch_size=self.batch_size, layer_decay=None, warmup_epochs=0.0,
                                       drop_path=0.0, seed=self.seed)

    def train_config(self, epochs: int, image_text: bool = True) -> TrainConfig:
        """The ``fit`` recipe. Image-text stages: peak lr ``lr * text_lr_scale`` for the text side, and through
        ``layer_decay`` (:meth:`ImageTextModel.group_matcher`) ``lr`` for the image encoder; baseline: ``lr``."""
        scale = float(self.text_lr_scale) if image_text else 1.0
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr * scale,
                           layer_decay=1.0 / scale if scale != 1.0 else None, weight_decay=self.weight_decay,
                           warmup_epochs=min(self.warmup_epochs, epochs - 1), seed=self.seed, monitor="valid_loss")


@dataclass
class MultimodalResult:
    model: ImageTextModel
    history: pd.DataFrame  # both stages, column "stage"
    out_dir: Path


def default_out_name(config: MultimodalConfig, train_texts: Sequence[str]) -> str:
    """Folder name under checkpoints/image_text/: the config and a hash of the training texts (another text rule
    makes another vocabulary, so it must not reload these weights)."""
    digest = hashlib.sha256("\n".join(sorted(set(train_texts))).encode()).hexdigest()[:8]
    return f"{config.scenario}-{config.backbone}-{config.image_size}px-seed{config.seed}-texts{digest}"


def _split(pairs: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = pairs[pairs["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"no {split!r} rows in the pairs table: the run's split is incomplete")
    return rows


def train_image_text(run: Any, config: MultimodalConfig, pairs: pd.DataFrame, cache: Any, mean: float, std: float,
                     classes: Sequence[str], out_name: str | None = None, quiet: bool = True,
                     image_encoder: nn.Module | None = None) -> MultimodalResult:
    """Stage 1 (alignment) and stage 2 (heads, consistency loss) through :func:`osteolib.engine.loop`.

    Writes ``checkpoints/image_text/<name>/{align,heads}/`` (name: :func:`default_out_name`); a finished run there is
    reloaded, not retrained (``fit(resume=True)``). Only training texts enter the vocabulary and the bank.
    ``image_encoder`` None: the config's backbone from its scenario's checkpoint (missing: FileNotFoundError);
    tests pass a tiny timm model instead.
    """
    train, valid = _split(pairs, "train"), _split(pairs, "val")
    torch.manual_seed(config.seed)  # the new layers' initialisation; fit reseeds only after the model exists
    if image_encoder is None:
        image_encoder, _report = finetune.build_model(config.finetune_config(), run, num_classes=len(classes))
    vocabulary = Vocabulary.from_texts(train["text"].tolist())
    model = ImageTextModel(image_encoder, vocabulary, TextBank.from_train_rows(train), len(classes),
                           config.text_dim, config.joint_dim)
    dls = make_pair_dataloaders(cache, train, valid, vocabulary, classes, config.image_size, config.batch_size,
                                mean, std, config.seed)
    out_dir = run.checkpoints / "image_text" / (out_name or default_out_name(config, train["text"]))
    model.stage = "align"
    align = fit(model, dls, config.train_config(config.align_epochs), out_dir / "align", stage="image_text_align",
                quiet=quiet, resume=True)
    model.stage = "heads"
    heads = fit(model, dls, config.train_config(config.epochs), out_dir / "heads", loss_func=consistency_loss,
                stage="image_text_heads", quiet=quiet, resume=True)
    history = pd.concat([align.history.assign(stage="align"), heads.history.assign(stage="heads")], ignore_index=True)
    model.eval()
    return MultimodalResult(model, history, out_dir)


def train_image_baseline(run: Any, config: MultimodalConfig, pairs: pd.DataFrame, cache: Any, mean: float,
                         std: float, classes: Sequence[str], out_name: str | None = None,
                         quiet: bool = True) -> tuple[nn.Module, pd.DataFrame]:
    """The plain image classifier: same encoder init, split, pixels and recipe, image-only CE, as many epochs as
    both image-text stages together."""
    train, valid = _split(pairs, "train"), _split(pairs, "val")
    lookup = {c: i for i, c in enumerate(classes)}
    torch.manual_seed(config.seed)  # the classifier's initialisation
    model, _report = finetune.build_model(config.finetune_config(), run, num_classes=len(classes))
    dls = make_dataloaders(cache, train["image_id"].tolist(), valid["image_id"].tolist(),
                           train_targets=[lookup[v] for v in train["label"]],
                           valid_targets=[lookup[v] for v in valid["label"]],
                           train_transform=crop_policy("none", config.image_size),
                           valid_transform=crop_policy("none", config.image_size), batch_size=config.batch_size,
                           seed=config.seed, mean=mean, std=std)
    out_dir = run.checkpoints / "image_text" / (out_name or default_out_name(config, train["text"]))
    recipe = config.train_config(config.align_epochs + config.epochs, image_text=False)
    result = fit(model, dls, recipe, out_dir / "baseline",
                 loss_func=nn.CrossEntropyLoss(), stage="image_baseline", quiet=quiet, resume=True)
    model.eval()
    return model, result.history.assign(stage="baseline")


# --------------------------------------------------------------------------------------------------
# 3 · Prediction from images only
# --------------------------------------------------------------------------------------------------

def _image_batches(cache: Any, image_ids: Sequence[str], image_size: int, mean: float, std: float,
                   batch_size: int) -> Iterator[torch.Tensor]:
    dataset = XrayDataset(cache, list(image_ids), transform=crop_policy("none", image_size), mean=mean, std=std)
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])


@torch.no_grad()
def predict(model: ImageTextModel, cache: Any, image_ids: Sequence[str], image_size: int, mean: float, std: float,
            classes: Sequence[str], batch_size: int = 64) -> pd.DataFrame:
    """Per image: both heads' probabilities and the retrieved training text. Takes no texts: none can leak."""
    device = next(model.parameters()).device
    rows = []
    with eval_mode(model):
        for images in _image_batches(cache, image_ids, image_size, mean, std, batch_size):
            features = model.image_features(images.to(device))
            index, similarity = model.retrieve(features)
            image_probs = torch.softmax(model.image_encoder.get_classifier()(features).float(), -1)
            text_probs = torch.softmax(model.text_head(model.text_encoder(model.bank_tokens[index])).float(), -1)
            for i in range(len(images)):
                rows.append({"retrieved_text": model.bank.texts[int(index[i])],
                             "retrieved_label": model.bank.labels[int(index[i])], "similarity": float(similarity[i]),
                             **{f"img_prob_{c}": float(image_probs[i, k]) for k, c in enumerate(classes)},
                             **{f"txt_prob_{c}": float(text_probs[i, k]) for k, c in enumerate(classes)}})
    return pd.DataFrame(rows).assign(image_id=list(image_ids))


@torch.no_grad()
def predict_baseline(model: nn.Module, cache: Any, image_ids: Sequence[str], image_size: int, mean: float,
                     std: float, classes: Sequence[str], batch_size: int = 64) -> pd.DataFrame:
    device = next(model.parameters()).device
    with eval_mode(model):
        probs = torch.cat([torch.softmax(model(b.to(device)).float(), -1).cpu()
                           for b in _image_batches(cache, image_ids, image_size, mean, std, batch_size)])
    return pd.DataFrame({f"base_prob_{c}": probs[:, k].numpy() for k, c in enumerate(classes)}).assign(
        image_id=list(image_ids))


# --------------------------------------------------------------------------------------------------
# 4 · Word attributions
# --------------------------------------------------------------------------------------------------

def word_attributions(text_encoder: BagOfWordsEncoder, text_head: nn.Module, vocabulary: Vocabulary, text: str,
                      target: int | None = None) -> pd.DataFrame:
    """Gradient x input on the token embeddings for the ``target`` logit (None: the predicted class), one row per
    word. For a bag of words with a linear head this is each word's exact share of the logit."""
    tokens = vocabulary.encode([text]).to(text_encoder.embedding.weight.device)
    embedded = text_encoder.embedding(tokens).detach().requires_grad_(True)
    logits = text_head(text_encoder.pool(embedded, tokens))
    target = int(logits.argmax(-1)) if target is None else int(target)
    (gradient,) = torch.autograd.grad(logits[0, target], embedded)
    scores = (gradient * embedded).sum(-1)[0, :len(tokenize(text))].detach().float().cpu()
    return pd.DataFrame({"word": tokenize(text), "attribution": scores.numpy().astype(float), "target": target})


def top_word_is_generating(attributions: pd.DataFrame, generating_words: frozenset[str]) -> bool:
    """Whether the word with the highest attribution is one the rule emitted because of the class."""
    return str(attributions.loc[attributions["attribution"].idxmax(), "word"]) in generating_words


def attribution_summary(model: ImageTextModel, texts: Sequence[str], generating_words: frozenset[str],
                        alpha: float = 0.05) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per text: the top-attributed word (for the text head's predicted class) and whether the rule emitted it
    because of the class; and the rate of such texts with its Wilson CI."""
    rows = []
    for text in texts:
        attributions = word_attributions(model.text_encoder, model.text_head, model.vocabulary, text)
        rows.append({"text": text, "explained_class": int(attributions["target"].iloc[0]),
                     "top_word": attributions.loc[attributions["attribution"].idxmax(), "word"],
                     "top_word_is_generating": top_word_is_generating(attributions, generating_words)})
    table = pd.DataFrame(rows)
    hits, n = int(table["top_word_is_generating"].sum()), len(table)
    low, high = stats.wilson_ci(hits, n, alpha)
    return table, {"rate": hits / n, "ci_low": low, "ci_high": high, "n": n,
                   "chance_rate": float(np.mean([np.mean([w in generating_words for w in tokenize(t)])
                                                 for t in texts]))}


# --------------------------------------------------------------------------------------------------
# Statistics tables
# --------------------------------------------------------------------------------------------------

def predicted_classes(predictions: pd.DataFrame, prefix: str, classes: Sequence[str]) -> np.ndarray:
    """Arg-max class index from the ``<prefix><class>`` probability columns."""
    return predictions[[f"{prefix}{c}" for c in classes]].to_numpy().argmax(1)


def metrics_table(y_true: Sequence[int], predicted: dict[str, Sequence[int]], alpha: float = 0.05,
                  positive: int = 1, negative: int = 0) -> pd.DataFrame:
    """Accuracy, sensitivity (recall of class ``positive``, the disease) and specificity (recall of class
    ``negative``, the healthy) with Wilson CIs, one row per model."""
    y = np.asarray(y_true)
    rows = []
    for name, pred in predicted.items():
        pred = np.asarray(pred)
        row = {"model": name, "n": len(y)}
        for measure, mask in (("accuracy", np.ones_like(y, bool)), ("sensitivity", y == positive),
                              ("specificity", y == negative)):
            hits, n = int((pred[mask] == y[mask]).sum()), int(mask.sum())
            low, high = stats.wilson_ci(hits, n, alpha) if n else (np.nan, np.nan)
            row.update({measure: hits / n if n else np.nan, f"{measure}_ci_low": low, f"{measure}_ci_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def mcnemar_table(y_true: Sequence[int], predicted: dict[str, Sequence[int]],
                  pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Paired McNemar tests of correctness for the given (A, B) model pairs."""
    y = np.asarray(y_true)
    rows = []
    for a, b in pairs:
        result = stats.mcnemar_paired(np.asarray(predicted[a]) == y, np.asarray(predicted[b]) == y)
        rows.append({"model_a": a, "model_b": b, "accuracy_a": result.accuracy_a, "accuracy_b": result.accuracy_b,
                     "diff": result.diff, "diff_ci_low": result.diff_ci_low, "diff_ci_high": result.diff_ci_high,
                     "only_a_right": result.b, "only_b_right": result.c, "method": result.method,
                     "p_value": result.p_value})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------

def highlighted_text(ax: plt.Axes, attributions: pd.DataFrame, title: str | None = None) -> None:
    """Words on coloured backgrounds: red = evidence for the explained class, blue = against, white = none."""
    scores = attributions["attribution"].to_numpy()
    scale = max(float(np.abs(scores).max()), 1e-12)
    colours = plt.get_cmap("bwr")
    ax.set_axis_off()
    renderer = ax.figure.canvas.get_renderer()  # measures each word without drawing the whole figure
    x, y = 0.02, 0.7
    for word, score in zip(attributions["word"], scores):
        label = ax.text(x, y, word, fontsize=9, transform=ax.transAxes, va="center",
                        bbox={"facecolor": colours(0.5 + 0.5 * score / scale), "edgecolor": "none", "pad": 1.5})
        extent = label.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
        x = extent.x1 + 0.02
        if x > 0.85:
            x, y = 0.02, y - 0.3
    if title:
        ax.set_title(title, fontsize=8)


def explanation_figure(images: torch.Tensor, cams: np.ndarray, regions: torch.Tensor | None,
                       attributions: Sequence[pd.DataFrame], titles: Sequence[str],
                       classes: Sequence[str] | None = None) -> plt.Figure:
    """One row per case: the image with its Grad-CAM (expert region outlined) beside the retrieved text, its words
    coloured by their attribution to the class the text head predicts (named when ``classes`` is given)."""
    from osteolib.explain import overlay

    fig, axes = plt.subplots(len(titles), 2, figsize=(7.5, 2.3 * len(titles)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2]})
    for row, title in enumerate(titles):
        region = None if regions is None else regions[row, 0].numpy() > 0
        overlay(images[row, 0].numpy(), cams[row], region=region, ax=axes[row, 0], title=title)
        target = int(attributions[row]["target"].iloc[0])
        explained = classes[target] if classes is not None else f"class {target}"
        highlighted_text(axes[row, 1], attributions[row],
                         title=f"retrieved training text · words for the text head's '{explained}'")
    fig.tight_layout()
    return fig


def training_curves_figure(history: pd.DataFrame) -> plt.Figure:
    """Training and validation loss per epoch of every stage (align, heads, baseline)."""
    stages = list(dict.fromkeys(history["stage"]))
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = history[history["stage"] == stage]
        ax.plot(rows["epoch"] + 1, rows["train_loss"], marker="o", label="train")
        ax.plot(rows["epoch"] + 1, rows["valid_loss"], marker="s", label="validation")
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("loss")
    fig.tight_layout()
    return fig
