"""The evaluate role: real speculative decoding with a target and a drafter.

`verifier` (the target with its KV cache and aux-hidden hooks), `specdec` (the decoding loop
and the target-alone baseline), `drafters` (EAGLE-3 chain, prompt lookup), `tree` (EAGLE-2
style tree drafting, greedy), `metrics` (acceptance and speed), `report` (JSON + PNG),
`setup` (target, drafts and prompts, resolved like serve-target) and `run` (the driver).
"""
