"""LoRA adapters: fine-tuning a category's adapter, its trajectory, PEFT folders, flattening and arithmetic."""
