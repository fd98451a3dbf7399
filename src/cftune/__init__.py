"""cftune: fine-tune language models without forgetting, using context-free synthetic data."""
__version__ = "0.1.0"
