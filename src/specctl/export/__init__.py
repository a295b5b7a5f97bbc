"""The export role: serving directories (SGLang / vLLM / speculators / hf), validated; imports.

`layout` (the exact tensor set and its check), `formats` (config.json per engine),
`mlp` (the MLP speculator's vLLM layout: tensors, check, config), `io` (read any draft dir,
load an `Eagle3Draft`), `serving` (export and import, both families).
"""
