"""fmerge: declarative, cached, data-aware merging of fine-tuned models."""

__version__ = "0.1.0"
