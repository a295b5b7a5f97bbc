"""specctl: train speculative-decoding draft models from streamed target hidden states."""

__version__ = "0.1.0"
