"""Layer 6, stages: one module per step of the study (pretraining, fine-tuning, image-text, checks); used as modules."""
