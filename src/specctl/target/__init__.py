"""The target role: prompts -> chat template + loss mask -> (regenerate) -> capture -> records.

Modules follow the data flow: `models` (resolve + load), `sources`/`data` (prompts),
`template` (token ids + assistant masks), `generate` (regeneration, self-prompts),
`capture` (forward hooks), `engines/` (hf, sglang), `producer` (the loop).
"""
