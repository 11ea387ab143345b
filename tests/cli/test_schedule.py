"""Steps and waves: which executions of a plan --jobs may run side by side."""
from collections import namedtuple

from osteolib.cli.osteo import select
from osteolib.cli.profiles import load_profile
from osteolib.cli.schedule import steps_of, waves_of

Cell = namedtuple("Cell", "notebook name")


def notebooks_of(waves):
    return [list(dict.fromkeys(e.notebook for e in wave)) for wave in waves]


def test_the_smoke_plan_runs_03_beside_02_and_06_beside_04():
    waves = waves_of(steps_of(select(load_profile("smoke"))))
    # 06 may start its image encoder from any pretraining checkpoint (its `scenario`), so it waits for 01-03
    assert notebooks_of(waves) == [["00_data_audit"], ["01_chest_mae"], ["02_shoulder_mae", "03_rotation_proxy"],
                                   ["04_finetune", "06_image_text"], ["04b_clinical_fusion"],
                                   ["05_gradcam_statistics"], ["07_report"]]
    # the two consecutive 04 entries stay one step, in the profile's order (ViT-S cells first)
    assert [e.parameters["backbone"] for e in waves[3] if e.notebook == "04_finetune"] == \
        ["vit_small"] * 2 + ["densenet121"] * 4


def test_a_notebook_the_table_does_not_know_waits_for_every_earlier_one():
    plan = [Cell("00_data_audit", "a"), Cell("lab_extra", "c"), Cell("01_chest_mae", "d")]
    assert notebooks_of(waves_of(steps_of(plan))) == [["00_data_audit"], ["lab_extra", "01_chest_mae"]]
    plan = [Cell("00_data_audit", "a"), Cell("01_chest_mae", "d"), Cell("lab_extra", "c"), Cell("03_rotation_proxy", "e")]
    assert notebooks_of(waves_of(steps_of(plan))) == [["00_data_audit"], ["01_chest_mae"],
                                                      ["lab_extra", "03_rotation_proxy"]]


def test_needs_outside_the_plan_are_met_and_a_repeated_notebook_never_starts_early():
    needs = {"a": (), "b": ("a",), "c": ("a",)}
    # --from b: a's outputs come from the parent run
    assert notebooks_of(waves_of(steps_of([Cell("b", 1), Cell("c", 2)]), needs)) == [["b", "c"]]
    # b listed again after c (not consecutive): its second step comes after its first
    plan = [Cell("a", 0), Cell("b", 1), Cell("c", 2), Cell("b", 3)]
    waves = waves_of(steps_of(plan), needs)
    assert [[e.name for e in w] for w in waves] == [[0], [1, 2], [3]]


def test_a_notebook_number_names_that_notebook_and_not_its_lettered_neighbours():
    from osteolib.study import notebook_matches

    assert notebook_matches("04_finetune", "04") and not notebook_matches("04a_recipe_search", "04")
    assert notebook_matches("04a_recipe_search", "04a") and notebook_matches("04b_clinical_fusion", "04b_clin")
    assert notebook_matches("05_gradcam_statistics", "05_gradcam_statistics")
    assert [e.notebook for e in select(load_profile("smoke"), only=["04b"])] == ["04b_clinical_fusion"]
    assert {e.notebook for e in select(load_profile("label_efficiency"), only=["04"])} == {"04_finetune"}
