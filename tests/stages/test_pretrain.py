"""Every pretraining scenario, both backbones: trains through the fit path and loads into the fine-tuning model."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from osteolib import models
from osteolib.stages import pretrain
from osteolib import runs
from osteolib.data import splits
from osteolib.data import synthetic
from osteolib.data import ImageCache
from osteolib.data import read_manifest

SIZE = 32
PATCH = {"vit_small": 8, "densenet121": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    chest = read_manifest(synthetic.write_chest_dataset(root / "chest", n_images=24, seed=1, size=64))
    chest = splits.patient_split(chest, ratios=[0.8, 0.2, 0.0], seed=0, keep_existing=False)
    target = read_manifest(synthetic.write_shoulder_dataset(root / "shoulder", n_patients=16, seed=2, size=64))
    return {"chest": (chest, ImageCache.build(chest, SIZE, root=root / "cache", progress=False)),
            "target": (target, ImageCache.build(target, SIZE, root=root / "cache", progress=False)),
            "runs": root / "runs"}


def stage(scenario: str, backbone: str, **overrides) -> pretrain.PretrainConfig:
    options = dict(image_size=SIZE, patch_size=PATCH[backbone], epochs=1, batch_size=4, warmup_epochs=0.0, seed=0)
    options.update(overrides)
    return pretrain.PretrainConfig(scenario, backbone, **options)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vit_small", "densenet121"])
def test_every_scenario_trains_and_loads_into_the_finetuning_model(data, backbone):
    run = runs.new_run("test", root=data["runs"])
    chest, chest_cache = data["chest"]
    target, target_cache = data["target"]
    written = {}
    written["chest_mae"] = pretrain.pretrain(run, stage("chest_mae", backbone), chest, chest_cache, 0.5, 0.25,
                                             quiet=True)
    for scenario, extra in (("chest_mae+target_mae_random", {}),
                            ("chest_mae+target_mae_center", {"crop_mode": "center", "mask_region_bias": 2.0}),
                            ("chest_mae+rotation", {})):
        result = pretrain.pretrain(run, stage(scenario, backbone, **extra), target, target_cache, 0.5, 0.25,
                                   quiet=True)
        assert result.init_report is not None and not result.init_report.missing  # started from chest MAE
        written[scenario] = result
    val_ids = target.loc[target["split"] == "val", "image_id"].tolist()
    per_rotation = pretrain.rotation_accuracy(written["chest_mae+rotation"].model, target_cache, val_ids, 0.5, 0.25)
    assert per_rotation["rotation"].tolist() == ["0°", "90°", "180°", "270°"]
    predicted = per_rotation[[f"predicted {a}°" for a in (0, 90, 180, 270)]].to_numpy()
    assert (predicted.sum(axis=1) == len(val_ids)).all()  # every image shown at every rotation, once
    assert per_rotation["accuracy"].tolist() == [predicted[k, k] / len(val_ids) for k in range(4)]
    for scenario, result in written.items():
        assert result.checkpoint == run.checkpoints / scenario / f"{backbone}.pt"
        assert result.fit.history["train_loss"].notna().all()
        kwargs = {"patch_size": PATCH[backbone]} if backbone == "vit_small" else {}
        model = models.create_backbone(backbone, num_classes=2, img_size=SIZE, **kwargs)
        report = models.load_pretrained(model, result.checkpoint)
        assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == [], scenario
        assert report.loaded > 100
        # the weights really arrived: the encoder equals the pretrained one
        encoder = models.encoder_state_dict(result.model)
        own = model.state_dict()
        name = next(k for k in encoder if k.endswith("weight") and k in own)
        assert torch.equal(own[name], encoder[name].to(own[name].dtype)), scenario
    # a run never retrains a scenario over its own checkpoint
    with pytest.raises(FileExistsError, match="never overwrites"):
        pretrain.pretrain(run, stage("chest_mae", backbone), chest, chest_cache, 0.5, 0.25, quiet=True)


def test_a_second_stage_without_its_chest_checkpoint_names_the_notebook(data, tmp_path):
    run = runs.new_run("test", root=tmp_path)
    target, cache = data["target"]
    with pytest.raises(FileNotFoundError, match="01_chest_mae"):
        pretrain.pretrain(run, stage("chest_mae+rotation", "densenet121"), target, cache, 0.5, 0.25, quiet=True)


def test_later_stages_mask_on_the_chest_stages_grid(data, tmp_path):
    # A DenseNet's masking grid loads silently on any size, and the grid decides template or image (real profile):
    # a later stage on another grid is refused before training; notebooks 02/03 read 01's grid from its checkpoint.
    run = runs.new_run("test", root=tmp_path)
    models.save_encoder_checkpoint(models.MaskedDenseNet(img_size=SIZE, patch_size=8),
                                   run.checkpoints / "chest_mae" / "densenet121.pt")
    assert pretrain.chest_patch_size(run, "densenet121") == 8
    target, cache = data["target"]
    with pytest.raises(ValueError, match="patch_size=16, but its starting checkpoint .* patch_size=8"):
        pretrain.pretrain(run, stage("chest_mae+target_mae_random", "densenet121"), target, cache, 0.5, 0.25,
                          quiet=True)
    assert not (run.checkpoints / "chest_mae+target_mae_random").exists()  # refused before any training


@pytest.mark.parametrize("scenario", ["chest_mae", "chest_mae+rotation"])
def test_a_stage_model_is_built_from_its_seed_whatever_the_generator_state(scenario):
    def weights(model):
        return torch.cat([t.detach().flatten().float() for t in model.state_dict().values()])

    torch.manual_seed(1)
    first = pretrain.build_model(stage(scenario, "vit_small"))
    torch.manual_seed(2)
    again = pretrain.build_model(stage(scenario, "vit_small"))
    other = pretrain.build_model(stage(scenario, "vit_small", seed=1))
    assert torch.equal(weights(first), weights(again))
    assert not torch.equal(weights(first), weights(other))


def test_config_refuses_what_the_study_does_not_define():
    with pytest.raises(ValueError, match="not a pretraining scenario"):
        pretrain.PretrainConfig("random", "vit_small")
    with pytest.raises(ValueError, match="no pretraining objective"):
        pretrain.PretrainConfig("chest_mae", "resnet50")
    with pytest.raises(ValueError, match="warmup_epochs=2 must be in"):
        pretrain.PretrainConfig("chest_mae", "vit_small", epochs=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="crop_mode='center'"):
        pretrain.PretrainConfig("chest_mae+target_mae_random", "vit_small", mask_region_bias=1.0)
    config = pretrain.PretrainConfig("chest_mae", "vit_small")
    assert (config.mask_ratio, config.patch_size, config.objective, config.init_scenario) == (0.9, 16, "masked", None)
    assert pretrain.PretrainConfig("chest_mae+rotation", "densenet121").init_scenario == "chest_mae"


class _PatchPredictor(torch.nn.Module):
    """A stand-in masked model: predicts each image's own standardised patches, or one fixed template."""

    patch_size = 8
    norm_pix_loss = True

    def __init__(self, oracle: bool):
        super().__init__()
        self.oracle = oracle
        self.template = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))

    def forward(self, imgs, generator=None):
        from osteolib.models.mae import normalise_patches, patchify

        mask = (torch.rand(1, 16, generator=generator) < 0.75).float()
        pred = normalise_patches(patchify(imgs, 8))[0] if self.oracle else self.template
        return torch.zeros(()), pred, mask


def test_template_check_tells_a_model_that_reads_the_image_from_one_that_predicts_a_template():
    images = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    reads = pretrain.template_check(_PatchPredictor(oracle=True), images)
    assert reads["own"] == pytest.approx(1.0) and abs(reads["other"]) < 0.2 and reads["images"] == 6
    template = pretrain.template_check(_PatchPredictor(oracle=False), images)
    assert template["between_predictions"] == pytest.approx(1.0)
    assert abs(template["own"] - template["other"]) < 0.1
    with pytest.raises(ValueError, match="N >= 2"):
        pretrain.template_check(_PatchPredictor(oracle=True), images[:1])


def test_the_template_check_runs_every_epoch_of_a_masked_stage_and_a_resumed_run_continues_its_table(data, tmp_path):
    chest, cache = data["chest"]
    run = runs.new_run("test", root=tmp_path)
    images = pretrain.example_images(cache, chest["image_id"].tolist()[:4], 0.5, 0.25)
    result = pretrain.pretrain(run, stage("chest_mae", "vit_small", epochs=2), chest, cache, 0.5, 0.25, quiet=True,
                               check_images=images)
    table = result.template_history
    assert table["epoch"].tolist() == [0, 1] and table["images"].tolist() == [4, 4]
    assert table[["own", "other", "between_predictions", "template"]].notna().all().all()
    figure = pretrain.template_check_figure(table)
    assert [line.get_label() for line in figure.axes[0].lines] == ["own image", "another image",
                                                                   "mean prediction (template)"]
    assert figure.axes[0].lines[0].get_ydata().tolist() == table["own"].tolist()
    written = run.checkpoints / "chest_mae" / "vit_small" / "template_check.csv"
    assert written.exists() and len(pd.read_csv(written)) == 2
    # a resumed run keeps the rows of the epochs it does not redo, and drops those it does
    callback = pretrain.TemplateCheckCallback(result.model, images, written)
    callback.learn = SimpleNamespace(first_epoch=1)
    callback.before_fit()
    assert [row["epoch"] for row in callback.rows] == [0]
    # a region-biased stage (fit wraps the model to feed it the region) is checked too
    target, target_cache = data["target"]
    target_images = pretrain.example_images(target_cache, target["image_id"].tolist()[:3], 0.5, 0.25)
    center = pretrain.pretrain(run, stage("chest_mae+target_mae_center", "vit_small", crop_mode="center",
                                          mask_region_bias=2.0), target, target_cache, 0.5, 0.25, quiet=True,
                               check_images=target_images)
    assert center.template_history["images"].tolist() == [3]
    with pytest.raises(ValueError, match="rotation proxy"):
        pretrain.pretrain(run, stage("chest_mae+rotation", "vit_small"), chest, cache, 0.5, 0.25, quiet=True,
                          check_images=images)
    with pytest.raises(ValueError, match="every must be >= 1"):
        pretrain.TemplateCheckCallback(result.model, images, written, every=0)


def test_the_memorisation_check_trains_a_copy_on_a_few_images_until_it_draws_them(data, tmp_path):
    # the synthetic shoulders differ from each other more than the synthetic chests, so a copy can memorise them
    target, cache = data["target"]
    run = runs.new_run("test", root=tmp_path)
    stage_result = pretrain.pretrain(run, stage("chest_mae", "vit_small", mask_ratio=0.5), target, cache, 0.5, 0.25,
                                     quiet=True)
    weights = {k: v.clone() for k, v in stage_result.model.state_dict().items()}
    check = pretrain.memorisation_check(run, stage_result, target, cache, 0.5, 0.25, n_images=4, steps=60,
                                        steps_per_epoch=20, base_lr=0.05)
    table = check.table()
    gap = table["own"] - table["other"]  # what the predictions say about *their* image beyond any image
    assert gap["memorised images, before"] < 0.1 and gap["memorised images, after"] > 0.2, table
    assert gap["held-out images, after"] < 0.1, table  # memorising is not learning
    assert list(table.index) == ["memorised images, before", "memorised images, after", "held-out images, before",
                                 "held-out images, after"]
    assert not set(check.held_out_ids) & set(check.image_ids) and len(check.image_ids) == 4
    assert check.fit.history["epoch"].tolist() == [0, 1, 2]
    assert all(torch.equal(v, weights[k]) for k, v in stage_result.model.state_dict().items())  # stage untouched
    assert (run.checkpoints / "chest_mae" / "vit_small_memorisation" / "history.csv").exists()
    with pytest.raises(FileExistsError, match="already ran the memorisation check"):
        pretrain.memorisation_check(run, stage_result, target, cache, 0.5, 0.25, n_images=4, steps=20,
                                    steps_per_epoch=20)
    with pytest.raises(ValueError, match="positive multiple of steps_per_epoch"):
        pretrain.memorisation_check(run, stage_result, target, cache, 0.5, 0.25, steps=30, steps_per_epoch=20)
    with pytest.raises(ValueError, match="n_images=100 needs at least that many training images"):
        pretrain.memorisation_check(run, stage_result, target, cache, 0.5, 0.25, n_images=100)
