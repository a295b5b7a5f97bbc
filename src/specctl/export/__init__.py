"""The export role: serving directories (SGLang / vLLM / speculators / hf), validated; EAGLE-3 import.

`layout` (the exact tensor set and its check), `formats` (config.json per engine),
`io` (read any draft dir, load an `Eagle3Draft`), `serving` (export and import).
"""
