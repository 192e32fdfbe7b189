"""The ICM-LoRA generator: task vectors (its condition), the CVAE, its training and sampling."""
