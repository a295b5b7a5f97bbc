"""EAGLE-3 draft models (plain nn.Modules) and the draft vocabulary mapping."""
