"""qlora: config-driven QLoRA fine-tuning (4-bit NF4 base + LoRA + TRL SFTTrainer)."""

__version__ = "0.1.0"
