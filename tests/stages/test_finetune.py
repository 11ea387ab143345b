"""The fine-tuning stage (osteolib.stages.finetune) and its recipe search (osteolib.stages.recipe_search): honest
selection, input checks, label fractions, layer decay,
prediction files, and the multi-scale DenseNet wired into the backbone factory.

Images are a synthetic 40-px stand-in cache (class 1 is brighter in the middle, so there is something to
learn); models are the real timm networks at 32 px, one or two epochs, on one thread.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import osteolib.stages.finetune as finetune_module
from osteolib.data.splits import LeakageError
from osteolib import models
from osteolib.evaluation import PREDICTION_COLUMNS, choose_threshold
from osteolib.stages.finetune import (
    FinetuneConfig,
    MixupCallback,
    build_model,
    check_finetune_inputs,
    finetune,
    label_fraction_subset,
    run_name,
    soft_cross_entropy,
    use_stage_layer_decay,
)
from osteolib.models import CheckpointMismatchError, MaskedDenseNet, mae_vit_small, save_encoder_checkpoint
from osteolib.runs import Run
from osteolib.engine import param_groups
from osteolib.stages import recipe_search
from osteolib.stages.finetune_config import SEARCHED

CACHE_SIZE, IMG = 40, 32
CLASSES = ["normal", "osteoporosis"]
MEAN, STD = 0.45, 0.25


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine run faster on one thread than with OpenMP threads waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_manifest(n_patients: int = 18) -> pd.DataFrame:
    """Two images per patient; patients alternate classes; splits by patient: 10 train, 4 val, 4 test."""
    rows = []
    for p in range(n_patients):
        split = "train" if p < 10 else "val" if p < 14 else "test"
        for k in range(2):
            rows.append({"image_id": f"img{2 * p + k:03d}", "label": CLASSES[p % 2], "patient_id": f"p{p:03d}",
                         "split": split})
    return pd.DataFrame(rows)


class RecordingImages:
    """The cache's image array, recording every row read (and markers the test adds) in one log."""

    def __init__(self, array: np.ndarray, log: list):
        self.array, self.log = array, log
        self.shape, self.dtype = array.shape, array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, key):
        rows = np.atleast_1d(np.arange(len(self.array))[key]).tolist()
        self.log.extend(int(r) for r in rows)
        return self.array[key]


def make_cache(manifest: pd.DataFrame, log: list | None = None) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    n = len(manifest)
    images = rng.integers(0, 160, (n, CACHE_SIZE, CACHE_SIZE), dtype=np.uint8)
    positive = (manifest["label"] == CLASSES[1]).to_numpy()
    images[positive, 10:30, 10:30] += 90  # the class signal
    ids = manifest["image_id"].tolist()
    return SimpleNamespace(images=images if log is None else RecordingImages(images, log), regions=None,
                           has_region=np.zeros(n, dtype=bool), image_ids=ids,
                           index={image_id: i for i, image_id in enumerate(ids)}, size=CACHE_SIZE)


def config(**overrides) -> FinetuneConfig:
    options = dict(scenario="random", backbone="mobilenetv3", image_size=IMG, epochs=2, batch_size=8,
                   warmup_epochs=0.5, base_lr=0.05, precision="fp32", randaug_magnitude=None)
    options.update(overrides)
    return FinetuneConfig(**options)


def densenet_checkpoint(run: Run, scenario: str = "chest_mae") -> str:
    """A masked-CNN (SimMIM) DenseNet121 checkpoint where the pretraining stage would write it."""
    torch.manual_seed(0)
    model = MaskedDenseNet(img_size=IMG, patch_size=16)
    with torch.no_grad():
        model.encoder.features.conv0.weight.add_(1.0)  # recognisable
    return str(save_encoder_checkpoint(model, run.checkpoints / scenario / "densenet121.pt"))


# --- configuration --------------------------------------------------------------------------------


def test_config_defaults_are_the_study_recipe_and_bad_fields_are_named():
    default = FinetuneConfig(scenario="chest_mae", backbone="vit_small")
    assert (default.randaug_magnitude, default.weight_decay, default.layer_decay, default.base_lr) == (6, 0.05, 0.55,
                                                                                                      6.25e-5)
    assert default.crop_scale == (0.5, 1.0) and default.hflip and default.mixup == default.cutmix == 0.0
    train = default.train_config()
    assert train.peak_lr == pytest.approx(6.25e-5 * 32 / 256) and train.monitor == "valid_auc"
    assert run_name(default) == "chest_mae-vit_small-seed0-frac1.0"
    bad = {"backbone": ("vit_huge", "backbone='vit_huge' is unknown"),
           "scenario": ("imagenet", "scenario='imagenet' is unknown"),
           "label_fraction": (0.0, "label_fraction must be in"),
           "warmup_epochs": (2.0, "warmup_epochs must be in"),
           "layer_decay": (1.5, "layer_decay must be in"),
           "crop_scale": (0.5, "crop_scale must be"),
           "precision": ("fp8", "precision must be one of")}
    for name, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            config(**{name: value})
    with pytest.raises(ValueError, match="crop_scale must be"):
        config(crop_scale=(0.8, 0.5))
    with pytest.raises(ValueError, match="even batch_size"):
        config(mixup=0.2, batch_size=7)


# --- label fraction -------------------------------------------------------------------------------


def test_label_fraction_subset_is_patient_level_stratified_nested_and_deterministic():
    rows = []
    for p in range(60):
        labels = ["a", "b"] if p % 10 == 9 else ["a" if p % 3 else "b"] * (1 + p % 2)  # some mixed patients
        rows += [{"image_id": f"p{p}-{k}", "patient_id": f"p{p}", "label": lab} for k, lab in enumerate(labels)]
    train = pd.DataFrame(rows)
    strata = train.groupby("patient_id")["label"].agg(lambda s: "|".join(sorted(set(s))))
    chosen = {f: label_fraction_subset(train, f, seed=3) for f in (0.1, 0.25, 0.5, 1.0)}
    patients = {f: set(c["patient_id"]) for f, c in chosen.items()}
    assert patients[0.1] < patients[0.25] < patients[0.5] < patients[1.0] == set(train["patient_id"])
    for fraction, subset in chosen.items():
        # whole patients only: every image of a chosen patient is in
        assert len(subset) == train["patient_id"].isin(patients[fraction]).sum()
        for stratum, members in strata.groupby(strata):
            kept = sum(p in patients[fraction] for p in members.index)
            assert kept == max(1, int(np.floor(fraction * len(members) + 0.5))), (fraction, stratum)
    assert list(chosen[0.5].index) == sorted(chosen[0.5].index)  # manifest order kept
    assert label_fraction_subset(train, 0.5, seed=3).equals(chosen[0.5])
    assert set(label_fraction_subset(train, 0.5, seed=4)["patient_id"]) != patients[0.5]
    no_patient = train.assign(patient_id=[""] + train["patient_id"].tolist()[1:])
    with pytest.raises(ValueError, match="no patient_id"):
        label_fraction_subset(no_patient, 0.5, seed=0)


# --- layer-wise lr decay by stage ------------------------------------------------------------------


def _scales(model) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, 0.55) for p in g["params"]}


def test_layer_decay_counts_dense_blocks_and_vit_blocks(tmp_path):
    run = Run(tmp_path / "run")
    densenet, _ = build_model(config(backbone="densenet121"), run)
    scales = _scales(densenet)
    assert sorted(set(scales.values())) == pytest.approx([0.55 ** k for k in range(5, -1, -1)])
    expected = {"features.conv0.weight": 5, "features.denseblock1.denselayer6.conv2.weight": 4,
                "features.transition1.conv.weight": 4, "features.denseblock2.denselayer1.conv1.weight": 3,
                "features.denseblock3.denselayer24.conv2.weight": 2, "features.denseblock4.denselayer1.conv1.weight": 1,
                "features.norm5.weight": 0, "classifier.weight": 0}
    for name, depth in expected.items():
        assert scales[name] == pytest.approx(0.55 ** depth), name
    # timm's own fine grouping would count the 58 dense layers: the reason for use_stage_layer_decay
    assert len(set(_scales(models.create_backbone("densenet121", num_classes=2, img_size=IMG)).values())) > 30

    vit, _ = build_model(config(backbone="vit_small"), run)
    scales = _scales(vit)
    assert scales["patch_embed.proj.weight"] == pytest.approx(0.55 ** 13)
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(0.55 ** 12)
    assert scales["blocks.11.mlp.fc2.weight"] == pytest.approx(0.55)
    assert scales["head.weight"] == 1.0
    assert vit.blocks[5].drop_path1.drop_prob == pytest.approx(0.1 * 5 / 11)  # drop path, ViT only

    multiscale, _ = build_model(config(backbone="densenet121_multiscale"), run)
    scales = _scales(multiscale)
    assert scales["backbone.features.conv0.weight"] == pytest.approx(0.55 ** 5)
    assert scales["backbone.features.transition2.norm.weight"] == pytest.approx(0.55 ** 3)
    assert scales["scale_heads.0.weight"] == scales["relevance.logits"] == 1.0
    with pytest.raises(TypeError, match="no group_matcher"):
        use_stage_layer_decay(torch.nn.Linear(2, 2))


def _weights(model) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in model.state_dict().values()])


def test_the_initialisation_is_a_function_of_the_seed_not_of_the_generator_state(tmp_path):
    """torch starts every process from another generator seed: the build must not depend on it (it did: two
    runs of one configuration in two processes started from different weights and ended apart)."""
    run = Run(tmp_path / "run")
    torch.manual_seed(123)
    first, _ = build_model(config(seed=4), run)
    torch.manual_seed(456)
    torch.rand(10)
    again, _ = build_model(config(seed=4), run)
    other, _ = build_model(config(seed=5), run)
    assert torch.equal(_weights(first), _weights(again))
    assert not torch.equal(_weights(first), _weights(other))


# --- bad inputs fail before training --------------------------------------------------------------


def test_bad_inputs_raise_before_any_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("fit was called although the inputs are bad")

    monkeypatch.setattr(finetune_module, "fit", no_training)
    run, manifest = Run(tmp_path / "run"), make_manifest()
    cache = make_cache(manifest)

    def attempt(cfg, data=manifest, **kw):
        return finetune(run, cfg, data, cache, MEAN, STD, quiet=True, **kw)

    with pytest.raises(ValueError, match="unknown backbone 'vit_huge'"):
        models.create_backbone("vit_huge")
    renamed = config()
    renamed.backbone = "vit_huge"  # a notebook changing a field after construction is checked again
    with pytest.raises(ValueError, match="backbone='vit_huge' is unknown"):
        attempt(renamed)
    with pytest.raises(FileNotFoundError, match=r"densenet121 from scenario 'chest_mae'.*01_chest_mae"):
        attempt(config(scenario="chest_mae", backbone="densenet121"))
    with pytest.raises(ValueError, match="pretraining stage trains only"):
        attempt(config(scenario="chest_mae", backbone="resnet50"))
    leaking = manifest.copy()
    leaking.loc[leaking["image_id"] == "img001", "split"] = "test"  # patient p000's second image: two splits
    with pytest.raises(LeakageError, match="patient 'p000' is in"):
        attempt(config(scenario="random"), data=leaking)

    # a ViT checkpoint where the DenseNet's should be: another architecture
    mae = mae_vit_small(img_size=IMG, patch_size=8, depth=1, decoder_depth=1, decoder_embed_dim=32,
                        decoder_num_heads=4)
    save_encoder_checkpoint(mae, run.checkpoints / "chest_mae+rotation" / "densenet121.pt")
    with pytest.raises(CheckpointMismatchError, match=r"chest_mae\+rotation.*holds a vit_small encoder"):
        attempt(config(scenario="chest_mae+rotation", backbone="densenet121"))
    # a ViT checkpoint of another depth: the loader's own refusal, with the scenario named
    save_encoder_checkpoint(mae, run.checkpoints / "chest_mae" / "vit_small.pt")
    checkpoint = models.read_checkpoint(run.checkpoints / "chest_mae" / "vit_small.pt")
    checkpoint["state_dict"]["blocks.1.norm1.weight"] = torch.ones(384)
    torch.save(checkpoint, run.checkpoints / "chest_mae" / "vit_small.pt")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)scenario 'chest_mae' for backbone 'vit_small'.*1 unexpected: blocks.1.norm1"):
        attempt(config(scenario="chest_mae", backbone="vit_small"))

    one_class_val = manifest.copy()
    one_class_val.loc[(one_class_val["split"] == "val") & (one_class_val["label"] == CLASSES[1]), "split"] = "test"
    with pytest.raises(ValueError, match="AUC undefined: the val split holds only class 'normal'"):
        attempt(config(), one_class_val)
    no_test = manifest[manifest["split"] != "test"]
    with pytest.raises(ValueError, match="no rows with split == 'test'"):
        attempt(config(), no_test)
    with pytest.raises(ValueError, match=r"outside classes"):
        attempt(config(), manifest, classes=["normal", "fracture"])
    with pytest.raises(ValueError, match="mixup/cutmix need full, even batches"):
        attempt(config(mixup=0.2, batch_size=32))
    run.predictions.joinpath(run_name(config()) + ".csv").write_text("done")
    with pytest.raises(FileExistsError, match="already finished"):
        attempt(config())


# --- a whole run: selection on validation, test read once afterwards --------------------------------


def test_finetune_selects_on_validation_and_reads_test_once_at_the_end(tmp_path, monkeypatch):
    run, manifest = Run(tmp_path / "run"), make_manifest()
    log: list = []
    cache = make_cache(manifest, log)
    real_fit, real_threshold = finetune_module.fit, finetune_module.choose_threshold

    def recording_fit(*args, **kwargs):
        log.append("fit starts")
        result = real_fit(*args, **kwargs)
        log.append("fit ends")
        return result

    def recording_threshold(*args, **kwargs):
        log.append("threshold chosen")
        return real_threshold(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "fit", recording_fit)
    monkeypatch.setattr(finetune_module, "choose_threshold", recording_threshold)
    cfg = config(epochs=3, warmup_epochs=1)
    result = finetune(run, cfg, manifest, cache, MEAN, STD, quiet=True)

    rows = {split: {cache.index[i] for i in manifest.loc[manifest["split"] == split, "image_id"]}
            for split in ("train", "val", "test")}
    chosen_at = log.index("threshold chosen")
    assert log.index("fit starts") < log.index("fit ends") < chosen_at
    before = [r for r in log[:chosen_at] if isinstance(r, int)]
    after = [r for r in log[chosen_at + 1:] if isinstance(r, int)]
    assert not rows["test"] & set(before), "a test image was read before the model and threshold were fixed"
    assert rows["val"] <= set(log[log.index("fit starts"):log.index("fit ends")])  # validation during fit
    assert sorted(after) == sorted(rows["test"])  # every test image read exactly once, last

    history = pd.read_csv(result.history_path)
    assert not [c for c in history.columns if "test" in c] and len(history) == 3
    assert result.chosen_epoch == int(history["epoch"][history["valid_auc"].idxmax()])
    assert result.valid_auc == pytest.approx(history["valid_auc"].max())
    # the selected (best.pt) weights are the ones that predicted: their val AUC is the monitored one
    assert result.val_metrics["auc"] == pytest.approx(result.valid_auc, abs=1e-6)

    table = pd.read_csv(result.predictions_path, dtype={"image_id": str})
    assert list(table.columns) == PREDICTION_COLUMNS[:3] + ["prob_normal", "prob_osteoporosis"] + \
        PREDICTION_COLUMNS[3:] + ["label_fraction"]
    for split in ("val", "test"):
        assert sorted(table.loc[table["split"] == split, "image_id"]) == \
            sorted(manifest.loc[manifest["split"] == split, "image_id"])
    assert set(table["scenario"]) == {"random"} and set(table["backbone"]) == {"mobilenetv3"}
    assert set(table["seed"]) == {0} and set(table["fold"]) == {0} and set(table["label_fraction"]) == {1.0}
    val = table[table["split"] == "val"]
    assert result.threshold == pytest.approx(choose_threshold(val["target"], val["prob_osteoporosis"]))
    assert result.test_metrics["threshold"] == result.threshold and result.test_metrics["split"] == "test"
    summary = json.loads(result.summary_path.read_text())
    assert summary["selection"]["split"] == summary["threshold"]["split"] == "val"
    assert summary["counts"]["test"] == {"normal": 4, "osteoporosis": 4}
    assert summary["torch_threads"] == torch.get_num_threads() == 1  # results depend on it: recorded
    assert (run.checkpoints / "finetune" / result.name / "best.pt").is_file()

    # the explanation stage rebuilds exactly the selected model from the run folder
    assert finetune_module.finetuned_runs(run) == [result.name]
    reloaded, reloaded_config, classes = finetune_module.load_finetuned(run, result.name)
    assert reloaded_config == cfg and classes == ["normal", "osteoporosis"] and not reloaded.training
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(v.cpu(), reloaded_state[k].cpu()) for k, v in result.model.state_dict().items())


# --- the multi-scale DenseNet: factory, checkpoints, fine-tuning -----------------------------------


def test_multiscale_densenet_loads_a_masked_cnn_checkpoint_and_finetunes(tmp_path):
    run, manifest = Run(tmp_path / "run"), make_manifest(n_patients=14)
    manifest.loc[manifest["patient_id"].isin(["p010", "p011"]), "split"] = "val"
    manifest.loc[manifest["patient_id"].isin(["p012", "p013"]), "split"] = "test"
    densenet_checkpoint(run)
    cfg = config(scenario="chest_mae", backbone="densenet121_multiscale", epochs=1, warmup_epochs=0, batch_size=4,
                 mixup=0.4, label_fraction=0.4)
    inputs = check_finetune_inputs(cfg, run, manifest)
    report = inputs.load_report
    assert report.kind == "masked_cnn" and report.missing == [] and report.unexpected == []
    assert report.loaded == len(models.encoder_state_dict(inputs.model)) == len(
        models.create_backbone("densenet121", num_classes=0, img_size=IMG).state_dict())
    assert all(k.startswith(("scale_heads.", "relevance.")) for k in report.new_keys)
    assert len(inputs.train_ids) == 8 and inputs.counts()["train_image_fraction"] == 0.4  # 2 of 5 patients per class

    result = finetune(run, cfg, manifest, make_cache(manifest), MEAN, STD, quiet=True)
    assert isinstance(result.model, models.MultiScaleDenseNet) and len(result.history) == 1
    # the fine-tuned multi-scale model saves and rebuilds as a "multiscale" checkpoint of arch densenet121
    path = save_encoder_checkpoint(result.model, tmp_path / "multiscale.pt")
    saved = models.read_checkpoint(path)
    assert (saved["kind"], saved["arch"]) == ("multiscale", "densenet121")
    rebuilt = models.model_from_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), result.model.state_dict().values()))
    plain = models.create_backbone("densenet121", num_classes=2, img_size=IMG)
    assert models.load_pretrained(plain, path).dropped[0].startswith("relevance.")
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        models.create_backbone("densenet121_multiscale", num_classes=0)
    assert models.encoder_arch("densenet121_multiscale") == "densenet121"


def test_vit_takes_patch_size_and_depth_from_its_checkpoint(tmp_path):
    run = Run(tmp_path / "run")
    mae = mae_vit_small(img_size=IMG, patch_size=8, depth=2, decoder_depth=1, decoder_embed_dim=32,
                        decoder_num_heads=4)
    save_encoder_checkpoint(mae, run.checkpoints / "chest_mae" / "vit_small.pt")
    model, report = build_model(config(scenario="chest_mae", backbone="vit_small"), run)
    assert model.patch_embed.patch_size == (8, 8) and len(model.blocks) == 2 and report.missing == []
    assert torch.equal(model.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    with pytest.raises(CheckpointMismatchError, match="uses patch_size 8"):
        build_model(config(scenario="chest_mae", backbone="vit_small", patch_size=16), run)
    with pytest.raises(CheckpointMismatchError, match="pretrained at img_size 32"):
        build_model(config(scenario="chest_mae", backbone="vit_small", image_size=64), run)


def test_a_finetuned_model_loads_without_its_pretraining_checkpoint(tmp_path):
    # Cells gathered from runs with different parents (osteo collect --parent) leave the pretraining checkpoints
    # behind: the summary's architecture record rebuilds the model, here a ViT unlike the default (patch 8, depth 2).
    trained = Run(tmp_path / "trained")
    mae = mae_vit_small(img_size=IMG, patch_size=8, depth=2, decoder_depth=1, decoder_embed_dim=32,
                        decoder_num_heads=4)
    save_encoder_checkpoint(mae, trained.checkpoints / "chest_mae" / "vit_small.pt")
    manifest = make_manifest()
    cfg = config(scenario="chest_mae", backbone="vit_small", epochs=1, warmup_epochs=0)
    result = finetune(trained, cfg, manifest, make_cache(manifest), 0.5, 0.25, quiet=True)
    summary = json.loads(result.summary_path.read_text())
    assert summary["architecture"] == {"in_chans": 1, "depth": 2, "patch_size": 8, "drop_path_rate": cfg.drop_path}

    gathered = Run(tmp_path / "gathered")
    for part in ("logs", "checkpoints/finetune"):
        shutil.copytree(trained.path / part, gathered.path / part)
    model, _, _ = finetune_module.load_finetuned(gathered, result.name)
    assert len(model.blocks) == 2
    reloaded_state = model.state_dict()
    assert all(torch.equal(v, reloaded_state[k]) for k, v in result.model.state_dict().items())

    # a summary from before the record: the default architecture is tried, and the strict load refuses it by name
    del summary["architecture"]
    (gathered.path / "logs" / f"{result.name}-summary.json").write_text(json.dumps(summary))
    with pytest.raises(CheckpointMismatchError, match=f"{result.name}-summary.json"):
        finetune_module.load_finetuned(gathered, result.name)


# --- mixup ------------------------------------------------------------------------------------------


def test_mixup_mixes_training_batches_only_and_the_loss_takes_soft_targets():
    callback = MixupCallback(mixup_alpha=0.4, cutmix_alpha=0.0, num_classes=2)
    images, targets = torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1])
    callback.learn = SimpleNamespace(training=False, xb=(images.clone(),), yb=(targets,))
    callback.before_batch()
    assert torch.equal(callback.learn.xb[0], images) and callback.learn.yb[0] is targets
    np.random.seed(0)
    callback.learn = SimpleNamespace(training=True, xb=(images.clone(),), yb=(targets,))
    callback.before_batch()
    soft = callback.learn.yb[0]
    assert soft.shape == (4, 2) and torch.allclose(soft.sum(dim=1), torch.ones(4))
    lam = float(soft[0, 0])  # image 0 (class 0) is mixed with image 3 (class 1), weight lam on its own class
    assert 0 < lam < 1 and torch.allclose(soft[3], torch.tensor([1 - lam, lam]))
    assert torch.allclose(callback.learn.xb[0], lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    logits = torch.randn(4, 2)
    one_hot = torch.nn.functional.one_hot(targets, 2).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot), soft_cross_entropy(logits, targets))
    assert torch.allclose(soft_cross_entropy(logits, targets), torch.nn.functional.cross_entropy(logits, targets))


# --- the recipe search: each initialisation's recipe chosen on validation only ------------------------


NIH = Path(os.environ.get("OSTEOLIB_DATA_ROOT", Path(__file__).resolve().parents[3] / "shared" / "data")) \
    / "nih-cxr14-subset"


def test_candidates_read_no_test_data_and_the_searched_recipe_is_the_best_mean_validation_auc(tmp_path):
    run, manifest = Run(tmp_path / "run"), make_manifest()
    log: list = []
    cache = make_cache(manifest, log)
    test_rows = {cache.index[i] for i in manifest.loc[manifest["split"] == "test", "image_id"]}
    # test labels no class knows: a search that took the test rows would fail on them
    unreadable = manifest.assign(label=np.where(manifest["split"] == "test", "??", manifest["label"]))
    candidates = {"still": dict(base_lr=1e-7, layer_decay=0.55), "moving": dict(base_lr=0.05, layer_decay=None)}
    for recipe, settings in candidates.items():
        for seed in (0, 1):
            result = recipe_search.search_candidate(run, config(recipe=recipe, seed=seed, **settings), unreadable,
                                                    cache, MEAN, STD, quiet=True)
            assert result.name.endswith(f"-recipe_{recipe}")
    assert not test_rows & {r for r in log if isinstance(r, int)}, "a candidate read a test image"
    folder = run.path / recipe_search.SEARCH_FOLDER
    for path in folder.glob("*-val.csv"):
        assert set(pd.read_csv(path)["split"]) == {"val"}
    for path in folder.glob("*-summary.json"):
        summary = json.loads(path.read_text())
        assert summary["splits_read"] == ["train", "val"] and "test" not in json.dumps(summary["selection"])
    assert not (run.checkpoints / recipe_search.SEARCH_FOLDER).exists() or \
        not any((run.checkpoints / recipe_search.SEARCH_FOLDER).iterdir())  # no candidate weights are kept
    assert not (run.path / "predictions").exists() or not any((run.path / "predictions").iterdir())

    paths = recipe_search.write_search_tables(run)
    table = pd.read_csv(paths["recipe_search"])
    assert len(pd.read_csv(paths["recipe_search_runs"])) == 4 and len(table) == 2
    best = table.loc[table["valid_auc_mean"].idxmax()]
    assert table["chosen"].tolist().count(True) == 1 and bool(best["chosen"])
    assert "Cost of the search: 4 training runs" in paths["recipe_search_md"].read_text()
    choice = json.loads(paths["recipe_choice"].read_text())["choices"]
    assert [c["recipe"] for c in choice] == [best["recipe"]]

    resolved = recipe_search.resolve_recipe(config(recipe=SEARCHED, seed=2), run)
    assert resolved.recipe == best["recipe"]
    assert resolved.base_lr == candidates[best["recipe"]]["base_lr"]
    assert resolved.layer_decay == candidates[best["recipe"]]["layer_decay"] and resolved.seed == 2
    assert recipe_search.resolve_recipe(config(recipe="mine"), run) == config(recipe="mine")  # a named recipe stays

    log.clear()
    result = finetune(run, resolved, manifest, cache, MEAN, STD, quiet=True)  # the curve's run reads test, once
    assert sorted(r for r in log if isinstance(r, int) and r in test_rows) == sorted(test_rows)
    assert json.loads(result.summary_path.read_text())["config"]["recipe"] == best["recipe"]


def test_searched_recipe_is_refused_unresolved_and_without_a_search(tmp_path):
    run, manifest = Run(tmp_path / "run"), make_manifest()
    with pytest.raises(FileNotFoundError, match="04a_recipe_search"):
        recipe_search.resolve_recipe(config(recipe=SEARCHED), run)
    with pytest.raises(ValueError, match="resolve it first"):
        finetune(run, config(recipe=SEARCHED), manifest, make_cache(manifest), MEAN, STD, quiet=True)
    with pytest.raises(ValueError, match="needs a recipe name"):
        recipe_search.search_candidate(run, config(), manifest, make_cache(manifest), MEAN, STD, quiet=True)
    with pytest.raises(ValueError, match="recipe must be None or a name"):
        FinetuneConfig(scenario="random", backbone="densenet121", recipe="lr 1e-3/decay")
    run.tables.mkdir(parents=True, exist_ok=True)
    (run.path / recipe_search.CHOICE_FILE).write_text(json.dumps({"choices": [
        {"scenario": "chest_mae", "backbone": "mobilenetv3", "recipe": "a", "settings": {"base_lr": 0.1}}]}))
    with pytest.raises(ValueError, match="no recipe for random / mobilenetv3"):
        recipe_search.resolve_recipe(config(recipe=SEARCHED), run)


def _runs(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame([{"scenario": s, "backbone": "densenet121", "recipe": r, "seed": seed, "label_fraction": 1.0,
                          "peak_lr": lr, "base_lr": lr * 8, "epochs": 4, "settings_json": json.dumps({"base_lr": lr * 8}),
                          "chosen_epoch": 1, "valid_auc": auc, "seconds": 10.0, "torch_threads": 1}
                         for s, r, lr, seed, auc in rows])


def test_the_choice_is_per_initialisation_by_mean_over_seeds_and_ties_go_to_the_steadier_recipe():
    table = recipe_search.search_table(_runs([
        ("random", "study", 1e-4, 0, 0.60), ("random", "study", 1e-4, 1, 0.62),
        ("random", "plain", 1e-3, 0, 0.90), ("random", "plain", 1e-3, 1, 0.50),  # mean 0.70: chosen
        ("chest_mae", "study", 1e-4, 0, 0.80), ("chest_mae", "study", 1e-4, 1, 0.80),  # tie at 0.80, SD 0: chosen
        ("chest_mae", "plain", 1e-3, 0, 0.70), ("chest_mae", "plain", 1e-3, 1, 0.90)]))
    chosen = table[table["chosen"]].set_index("scenario")["recipe"].to_dict()
    assert chosen == {"random": "plain", "chest_mae": "study"}
    assert table.set_index(["scenario", "recipe"]).loc[("random", "plain"), "valid_auc_per_seed"] == "0.900 0.500"
    mixed = _runs([("random", "study", 1e-4, 0, 0.6), ("random", "study", 3e-4, 1, 0.6)])
    with pytest.raises(ValueError, match="different settings"):
        recipe_search.search_table(mixed)


@pytest.mark.skipif(not NIH.is_dir(), reason=f"the NIH subset is not at {NIH} (set OSTEOLIB_DATA_ROOT)")
def test_label_subsets_of_the_nih_patients_are_nested_patient_level_and_stratified():
    table = pd.read_csv(NIH / "Data_Entry_2017_v2020_subset.csv")
    rows = pd.DataFrame({"image_id": table["Image Index"].astype(str), "patient_id": table["Patient ID"].astype(str),
                         "label": np.where(table["Finding Labels"].str.contains("Pneumonia"), "pneumonia",
                                           "no_finding")})
    fractions = (0.05, 0.1, 0.25, 0.5, 1.0)
    for seed in (0, 1, 2):
        subsets = [label_fraction_subset(rows, f, seed) for f in fractions]
        patients = [set(s["patient_id"]) for s in subsets]
        assert all(a < b for a, b in zip(patients, patients[1:]))  # nested, each strictly larger
        strata = rows.groupby("patient_id")["label"].agg(lambda s: "|".join(sorted(set(s))))
        for fraction, subset, kept in zip(fractions, subsets, patients):
            assert len(subset) == rows["patient_id"].isin(kept).sum()  # whole patients
            for stratum, members in strata.groupby(strata):  # stratified: each label set keeps its share
                assert sum(p in kept for p in members.index) == max(1, int(np.floor(fraction * len(members) + 0.5)))
            assert abs(len(kept) / rows["patient_id"].nunique() - fraction) < 0.01
