"""napari-mris-train: tokenizers, the NTP-MRISeg training recipe, LoRA fine-tuning and evaluation."""
