"""spt: Selective Prompt Tuning for persona-grounded dialogue on any HuggingFace causal LM."""

__version__ = "0.1.0"
