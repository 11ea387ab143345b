"""Image-text explanations: rule texts, losses, no test-text leak, word attributions (osteolib.stages.image_text)."""
from __future__ import annotations

import copy
import types

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from osteolib.stages import image_text as mm
from osteolib.data import synthetic
from osteolib.models import create_backbone
from osteolib.data import read_manifest
from osteolib.runs import Run

CLASSES = ("normal", "osteoporosis")


# -- 1 · texts by rule ------------------------------------------------------------------------------------------

def test_nih_text_uses_the_patients_side_and_thirds_of_the_height():
    # A box centred in the image's left half and top third: the patient's right upper zone.
    box_right_upper = {"x": 100, "y": 50, "w": 200, "h": 150, "label": "Pneumonia"}
    box_left_lower = {"x": 700, "y": 800, "w": 200, "h": 150, "label": "Atelectasis"}
    assert mm.nih_text("pneumonia", [box_right_upper], 1024, 1024) == "pneumonia, pneumonia in right upper zone"
    assert mm.nih_text("pneumonia", [box_right_upper, box_left_lower], 1024, 1024) == (
        "pneumonia, pneumonia in right upper zone, atelectasis in left lower zone")
    assert mm.nih_text("pneumonia", None, 1024, 1024) == "pneumonia"
    assert mm.nih_text("no_finding", [], 1024, 1024) == "no finding"


def test_nih_texts_needs_boxes_and_sizes():
    with pytest.raises(ValueError, match="boxes"):
        mm.nih_texts(pd.DataFrame({"image_id": ["a"], "split": ["train"], "label": ["pneumonia"]}))


def test_shoulder_rule_cuts_separate_the_generators_classes():
    rule = mm.ShoulderTextRule.from_generator(CLASSES, difficulty=0.5, n_draws=400)
    rng = np.random.default_rng(1)
    thin = {label: np.mean([rule.level(synthetic.draw_shoulder_patient(rng, label, 0.5, CLASSES).cti,
                                       rule.cti_cuts) for _ in range(300)]) for label in CLASSES}
    # The cut lies between the class medians, so each class gets its own word most of the time.
    assert thin["normal"] < 0.3 and thin["osteoporosis"] > 0.7
    text = rule.text("osteoporosis", cti=0.2, trabecular_density=0.2, side="L", view="AP")
    assert text == "osteoporosis, thin cortex, sparse trabeculae, left humerus, ap view"
    assert rule.generating_words() == {"normal", "osteoporosis", "thin", "thick", "sparse", "dense"}
    with pytest.raises(ValueError, match="side"):
        rule.text("normal", 0.5, 0.5, side="X", view="AP")


def test_pair_table_reads_the_generators_parameters(tmp_path):
    manifest_path = synthetic.write_shoulder_dataset(tmp_path / "shoulder", n_patients=6, size=32, workers=1)
    manifest = read_manifest(manifest_path)
    pairs = mm.pair_table(manifest)
    parameters = pd.read_csv(tmp_path / "shoulder" / "parameters.csv").set_index("image_id")
    assert len(pairs.table) == len(manifest)
    for row in pairs.table.itertuples():
        words = mm.tokenize(row.text)
        assert words[0] == row.label
        side = {"R": "right", "L": "left"}[parameters.at[row.image_id, "side"]]
        assert side in words and ("thin" in words) == (parameters.at[row.image_id, "cti"] < pairs.rule["cti_cuts"][0])
    (tmp_path / "shoulder" / "parameters.csv").unlink()
    with pytest.raises(FileNotFoundError, match="parameters.csv"):
        mm.pair_table(manifest)


# -- 2 · losses ------------------------------------------------------------------------------------------------

def test_consistency_loss_is_the_mean_of_the_three_cross_entropies():
    torch.manual_seed(0)
    pred, target = torch.randn(5, 2, 3), torch.tensor([0, 1, 2, 1, 0])
    soft = torch.softmax(pred[:, 1], -1)
    expected = (F.cross_entropy(pred[:, 0], target) + F.cross_entropy(pred[:, 1], target)
                - (soft * F.log_softmax(pred[:, 0], -1)).sum(-1).mean()) / 3
    assert torch.isclose(mm.consistency_loss(pred, target), expected)


def test_contrastive_loss_counts_repeated_texts_as_positives():
    tokens = torch.tensor([[2, 3], [2, 3], [4, 5]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(np.log(10.0))
    aligned = mm.contrastive_loss(texts.clone(), texts, tokens, scale)
    crossed = mm.contrastive_loss(texts.flip(0), texts, tokens, scale)
    assert aligned < crossed
    # Rows 0 and 1 share a text: each image is as close to both copies, and both are targets (1/2 each), so the
    # loss is (2/3) log 2 (plus e^-10 terms), the least it can be with two copies of one text.
    assert aligned.item() == pytest.approx(2 / 3 * np.log(2), abs=1e-3)


# -- 3 · no test text is read --------------------------------------------------------------------------------------

def _tiny_cache(n: int, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    ids = [f"img{i}" for i in range(n)]
    return types.SimpleNamespace(images=images, regions=None, has_region=np.zeros(n, bool), image_ids=ids,
                                 index={i: k for k, i in enumerate(ids)}, size=size)


def _pairs(n: int) -> pd.DataFrame:
    splits = ["train"] * (n - 8) + ["val"] * 4 + ["test"] * 4
    labels = [CLASSES[i % 2] for i in range(n)]
    texts = [f"{label}, {'thin' if label == 'osteoporosis' else 'thick'} cortex" for label in labels]
    return pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "split": splits, "label": labels, "text": texts})


def test_text_bank_takes_training_rows_only():
    pairs = _pairs(16)
    bank = mm.TextBank.from_train_rows(pairs[pairs["split"] == "train"])
    assert set(bank.texts) == {"normal, thick cortex", "osteoporosis, thin cortex"}
    with pytest.raises(ValueError, match="training rows only"):
        mm.TextBank.from_train_rows(pairs)


def test_poisoned_test_texts_change_nothing(tmp_path):
    cache, pairs = _tiny_cache(24), _pairs(24)
    poisoned = pairs.copy()
    poisoned.loc[poisoned["split"] == "test", "text"] = "sentinel leak word"
    config = mm.MultimodalConfig(image_size=32, align_epochs=1, epochs=1, batch_size=8, backbone="vit_small")
    torch.manual_seed(0)
    encoder = create_backbone("vit_small", num_classes=2, img_size=32, patch_size=16, depth=1, embed_dim=32,
                              num_heads=2)
    outputs = []
    for name, table in (("clean", pairs), ("poisoned", poisoned)):
        torch.manual_seed(1)  # the text encoder's initialisation
        result = mm.train_image_text(Run(tmp_path / name), config, table, cache, 0.5, 0.25, CLASSES,
                                     image_encoder=copy.deepcopy(encoder))
        assert "sentinel" not in result.model.vocabulary.words
        assert all("sentinel" not in t for t in result.model.bank.texts)
        test_ids = table.loc[table["split"] == "test", "image_id"]
        outputs.append(mm.predict(result.model, cache, test_ids, 32, 0.5, 0.25, CLASSES))
    pd.testing.assert_frame_equal(outputs[0], outputs[1])
    # Executing again on the same run folder reloads the finished stages instead of training or failing.
    again = mm.train_image_text(Run(tmp_path / "clean"), config, pairs, cache, 0.5, 0.25, CLASSES,
                                image_encoder=copy.deepcopy(encoder))
    pd.testing.assert_frame_equal(mm.predict(again.model, cache, test_ids, 32, 0.5, 0.25, CLASSES), outputs[0])
    # Predictions are made in eval mode whatever the caller's mode was, and the caller's mode is given back.
    again.model.train()
    pd.testing.assert_frame_equal(mm.predict(again.model, cache, test_ids, 32, 0.5, 0.25, CLASSES), outputs[0])
    assert again.model.training
    assert set(outputs[0]["retrieved_text"]) <= set(pairs.loc[pairs["split"] == "train", "text"])


def test_missing_pretraining_checkpoint_fails_before_training(tmp_path):
    config = mm.MultimodalConfig(image_size=32, align_epochs=1, epochs=1, batch_size=8)
    with pytest.raises(FileNotFoundError, match="chest_mae"):
        mm.train_image_text(Run(tmp_path), config, _pairs(24), _tiny_cache(24), 0.5, 0.25, CLASSES)
    with pytest.raises(ValueError, match="scenario"):
        mm.MultimodalConfig(scenario="random")


# -- 4 · word attributions -----------------------------------------------------------------------------------------

def test_generating_words_get_the_highest_attribution():
    # Texts without the class name: only the cortex / trabecular words carry the class; side and view do not.
    rule = mm.ShoulderTextRule.from_generator(CLASSES, difficulty=0.0, n_draws=300, include_class_name=False)
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for k in range(200):
        label = CLASSES[k % 2]
        patient = synthetic.draw_shoulder_patient(rng, label, 0.0, CLASSES)
        texts.append(rule.text(label, patient.cti, patient.trabecular_density, patient.side, ["AP", "Y"][k % 3 == 0]))
        labels.append(k % 2)
    vocabulary = mm.Vocabulary.from_texts(texts)
    torch.manual_seed(0)
    encoder, head = mm.BagOfWordsEncoder(len(vocabulary.words), 16), torch.nn.Linear(16, 2)
    optimiser = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=0.03)
    tokens, targets = vocabulary.encode(texts), torch.tensor(labels)
    # A plain loop: a two-layer text classifier on 200 texts needs no checkpoints or schedule.
    for _ in range(150):
        optimiser.zero_grad()
        F.cross_entropy(head(encoder(tokens)), targets).backward()
        optimiser.step()
    accuracy = (head(encoder(tokens)).argmax(-1) == targets).float().mean().item()
    assert accuracy > 0.9
    tops = [mm.top_word_is_generating(mm.word_attributions(encoder, head, vocabulary, t), rule.generating_words())
            for t in texts]
    assert np.mean(tops) > 0.95
    text = "thin cortex, sparse trabeculae, left humerus, ap view"
    attributions = mm.word_attributions(encoder, head, vocabulary, text, target=1)
    assert list(attributions["word"]) == ["thin", "cortex", "sparse", "trabeculae", "left", "humerus", "ap", "view"]
    # gradient x input of a bag of words with a linear head sums to the logit minus the bias
    logit = head(encoder(vocabulary.encode([text])))[0, 1]
    assert np.isclose(attributions["attribution"].sum(), (logit - head.bias[1]).item(), atol=1e-5)


# -- statistics --------------------------------------------------------------------------------------------------

def test_metrics_and_mcnemar_tables():
    y = [0, 0, 1, 1, 1, 0]
    table = mm.metrics_table(y, {"a": [0, 0, 1, 1, 0, 0], "b": [1, 0, 1, 1, 1, 1]})
    a = table.set_index("model").loc["a"]
    assert a["accuracy"] == pytest.approx(5 / 6) and a["sensitivity"] == pytest.approx(2 / 3)
    assert a["specificity"] == 1.0 and a["accuracy_ci_low"] < a["accuracy"] < a["accuracy_ci_high"]
    tests = mm.mcnemar_table(y, {"a": [0, 0, 1, 1, 0, 0], "b": [1, 0, 1, 1, 1, 1]}, [("a", "b")])
    assert tests.loc[0, "only_a_right"] == 2 and tests.loc[0, "only_b_right"] == 1


def test_text_side_learns_faster_than_the_pretrained_image_encoder():
    from osteolib.engine import param_groups

    pairs = _pairs(16)
    train = pairs[pairs["split"] == "train"]
    encoder = create_backbone("vit_small", num_classes=2, img_size=32, patch_size=16, depth=1, embed_dim=32,
                              num_heads=2)
    model = mm.ImageTextModel(encoder, mm.Vocabulary.from_texts(train["text"]), mm.TextBank.from_train_rows(train), 2)
    config = mm.MultimodalConfig(lr=1e-4, text_lr_scale=10.0).train_config(3)
    assert config.peak_lr == pytest.approx(1e-3)
    scale_of = {id(p): g["lr_scale"] for g in param_groups(model, config.weight_decay, config.layer_decay)
                for p in g["params"]}
    assert all(scale_of[id(p)] == pytest.approx(0.1) for p in model.image_encoder.parameters())
    assert scale_of[id(model.text_encoder.embedding.weight)] == 1.0 and scale_of[id(model.text_head.weight)] == 1.0
    baseline = mm.MultimodalConfig(lr=1e-4).train_config(3, image_text=False)
    assert baseline.peak_lr == pytest.approx(1e-4) and baseline.layer_decay is None


def test_a_label_tables_own_reports_become_the_texts():
    manifest = pd.DataFrame({"image_id": ["a", "b", "c"], "split": ["train", "valid", "test"],
                             "label": ["normal", "osteoporosis", "normal"], "source": ["lab"] * 3,
                             "report": ["Normal bone density.", "Thin cortex; osteoporosis likely", "normal"]})
    pairs = mm.pair_table(manifest, text_column="report")
    assert pairs.table["text"].tolist() == manifest["report"].tolist()
    assert pairs.generating_words == {"normal", "osteoporosis"} and pairs.rule["kind"] == "reports"
    with pytest.raises(ValueError, match="text_column='findings' is not a manifest column"):
        mm.pair_table(manifest, text_column="findings")
    with pytest.raises(ValueError, match=r"1 image\(s\) have no text in column 'report', e.g. \['b'\]"):
        mm.pair_table(manifest.assign(report=["x", None, "y"]), text_column="report")
