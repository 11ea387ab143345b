"""The study's vocabulary (a leaf): its pretraining scenarios, the backbones pretraining trains, which notebook
writes each scenario's checkpoint and which earlier notebooks each one reads. One place, so stages, runner and error
messages agree."""
from __future__ import annotations

# the initialisations the fine-tuning grid compares; "random" needs no checkpoint
SCENARIOS = ("random", "chest_mae", "chest_mae+target_mae_random", "chest_mae+target_mae_center",
             "chest_mae+rotation")
# a fine-tuning run from weights the user brings (FinetuneConfig.init_checkpoint); not a pretraining scenario of the grid
OWN_CHECKPOINT = "own_checkpoint"
FINETUNE_SCENARIOS = SCENARIOS + (OWN_CHECKPOINT,)
PRETRAINING_BACKBONES = ("vit_small", "densenet121")
# the pretraining scenario each pretraining notebook trains (notebook 02: its crop_mode decides)
NOTEBOOK_SCENARIO = {"01_chest_mae": "chest_mae", "02_shoulder_mae": "chest_mae+target_mae_{crop_mode}",
                     "03_rotation_proxy": "chest_mae+rotation"}
# the earlier notebooks whose outputs each notebook reads (besides the data of its own parameters). With --jobs the
# runner starts a notebook's executions beside others once these are done (03 does not wait for 02, 06 not for 05); a
# notebook not listed here (07_report, a lab's own) waits for every notebook listed before it in the profile.
NOTEBOOK_NEEDS = {
    "00_data_audit": (),
    "01_chest_mae": ("00_data_audit",),  # keeps the external test set's patients out of the chest pool
    "02_shoulder_mae": ("00_data_audit", "01_chest_mae"),
    "03_rotation_proxy": ("00_data_audit", "01_chest_mae"),  # starts from the chest MAE encoder
    # trains each candidate recipe from the pretraining checkpoints; its choice (the `recipe_search` step) feeds 04
    "04a_recipe_search": ("00_data_audit", "01_chest_mae", "02_shoulder_mae", "03_rotation_proxy"),
    "04_finetune": ("00_data_audit", "01_chest_mae", "02_shoulder_mae", "03_rotation_proxy", "04a_recipe_search"),
    # fuses the model 04's results tables chose with the clinical covariates of 00
    "04b_clinical_fusion": ("00_data_audit", "04_finetune"),
    # and 04b: it reads nothing of 04b's, but 04b is seconds of work, and a wave of both would pin 05 (minutes) to
    # half of the cores
    "05_gradcam_statistics": ("00_data_audit", "04_finetune", "04b_clinical_fusion"),  # and 04's results tables (its `after`)
    # its image encoder may start from any pretraining scenario's checkpoint (its `scenario` parameter)
    "06_image_text": ("00_data_audit", "01_chest_mae", "02_shoulder_mae", "03_rotation_proxy"),
}
# which notebook writes each scenario's checkpoint (for error messages)
WRITTEN_BY = {"chest_mae": "01_chest_mae", "chest_mae+target_mae_random": "02_shoulder_mae (crop_mode='random')",
              "chest_mae+target_mae_center": "02_shoulder_mae (crop_mode='center')",
              "chest_mae+rotation": "03_rotation_proxy"}


def notebook_matches(name: str, prefix: str) -> bool:
    """Whether notebook ``name`` is the one ``prefix`` means: the name itself, its number ("04" is 04_finetune, not
    04a_recipe_search, whose number is "04a"), or else a longer prefix of the name ("04_fine", "05_grad")."""
    number = name.split("_", 1)[0]
    if prefix == name or prefix == number:
        return True
    return len(prefix) > len(number) and name.startswith(prefix)
