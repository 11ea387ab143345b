"""The study's vocabulary (a leaf): its pretraining scenarios, the backbones pretraining trains, and which notebook
writes each scenario's checkpoint. One place, so stages, runner and error messages agree."""
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
# which notebook writes each scenario's checkpoint (for error messages)
WRITTEN_BY = {"chest_mae": "01_chest_mae", "chest_mae+target_mae_random": "02_shoulder_mae (crop_mode='random')",
              "chest_mae+target_mae_center": "02_shoulder_mae (crop_mode='center')",
              "chest_mae+rotation": "03_rotation_proxy"}
