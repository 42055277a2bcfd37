"""phi2sum: fine-tune a small causal LM (Phi-2 by default) on dialogue summarization with LoRA/QLoRA."""

__version__ = "0.1.0"
