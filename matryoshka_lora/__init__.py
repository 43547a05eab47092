"""matryoshka-lora: train and serve nested-rank (Matryoshka) LoRA adapters."""

__version__ = "0.1.0"
