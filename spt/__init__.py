"""spt: Selective Prompt Tuning for persona-grounded dialogue on any HuggingFace causal LM."""

__version__ = "0.1.0"

__all__ = ["Example", "Reply", "Responder", "load"]


def __getattr__(name: str):  # keep `import spt` light: torch and transformers load on first use
    if name in ("load", "Responder", "Reply"):
        from . import api

        return getattr(api, name)
    if name == "Example":
        from .data import Example

        return Example
    raise AttributeError(name)
