"""EAGLE-3 draft: export key names, incremental decoding == one-shot, target rows loading."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specctl.draft.eagle3 import DraftCache, Eagle3Config, Eagle3Draft, load_target_rows

pytestmark = pytest.mark.unit

SGLANG_KEYS = {
    "d2t",
    "t2d",
    "embed_tokens.weight",
    "fc.weight",
    "norm.weight",
    "lm_head.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
}


def tiny_target_config(**kw: object) -> LlamaConfig:
    args: dict = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
        rope_theta=5e4,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    args.update(kw)
    return LlamaConfig(**args)


def test_config_from_target_and_state_dict_names() -> None:
    cfg = Eagle3Config.from_target_config(tiny_target_config(), draft_vocab_size=50)
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads) == (32, 8, 2)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.vocab_size) == (5e4, 1e-6, 120)
    assert Eagle3Config.from_target_config(tiny_target_config()).draft_vocab_size == 120
    draft = Eagle3Draft(cfg)
    sd = draft.state_dict()
    assert set(sd) == SGLANG_KEYS
    assert sd["midlayer.self_attn.q_proj.weight"].shape == (32, 64)  # input width 2H
    assert sd["fc.weight"].shape == (32, 96)
    assert sd["lm_head.weight"].shape == (50, 32)
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool
    assert not draft.embed_tokens.weight.requires_grad


def test_incremental_decode_matches_one_shot_and_crop() -> None:
    torch.manual_seed(0)
    draft = Eagle3Draft(Eagle3Config.from_target_config(tiny_target_config(), 60)).eval()
    ids = torch.randint(0, 120, (2, 9))
    hidden = draft.combine(torch.randn(2, 9, 96))
    pos = torch.arange(9).expand(2, 9)
    full_logits, full_h = draft.decode(ids, hidden, pos, DraftCache())
    cache = DraftCache(capacity=2)  # forces growth
    parts = [
        draft.decode(ids[:, a:b], hidden[:, a:b], pos[:, a:b], cache)
        for a, b in [(0, 4), (4, 5), (5, 9)]
    ]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), full_logits)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], 1), full_h)
    # Crop away 3 positions and redo them: same result (stale keys are overwritten).
    cache.crop(6)
    logits, _ = draft.decode(ids[:, 6:], hidden[:, 6:], pos[:, 6:], cache)
    torch.testing.assert_close(logits, full_logits[:, 6:])
    with pytest.raises(ValueError):
        cache.crop(10)


def test_forward_semantics_embeddings_first_and_residual() -> None:
    """The layer input is cat([input_layernorm(emb), hidden_norm(h)]): swapping norms' weights
    on one half must only change the result through that half."""
    torch.manual_seed(1)
    draft = Eagle3Draft(Eagle3Config.from_target_config(tiny_target_config(), 60)).eval()
    ids = torch.randint(0, 120, (1, 1))
    h = torch.randn(1, 1, 32)
    layer = draft.midlayer
    with torch.no_grad():
        x = torch.cat([layer.input_layernorm(draft.embed_tokens(ids)), layer.hidden_norm(h)], -1)
        v = layer.self_attn.v_proj(x)  # one key: attention output = v
        attn = layer.self_attn.o_proj(v.view(1, 1, 2, 8).repeat_interleave(2, 2).reshape(1, 1, 32))
        mid = h + attn
        expect_h = mid + layer.mlp(layer.post_attention_layernorm(mid))
        logits, h_out = draft.decode(ids, h, torch.zeros(1, 1, dtype=torch.long), DraftCache())
    torch.testing.assert_close(h_out, expect_h)
    torch.testing.assert_close(logits, draft.lm_head(draft.norm(expect_h)))


def test_load_target_rows_tied_and_init(tmp_path) -> None:
    torch.manual_seed(2)
    target = LlamaForCausalLM(tiny_target_config())
    target.save_pretrained(tmp_path)
    embed, head = load_target_rows(tmp_path)
    torch.testing.assert_close(embed, target.model.embed_tokens.weight)
    torch.testing.assert_close(head, target.lm_head.weight)
    untied = LlamaForCausalLM(tiny_target_config(tie_word_embeddings=False))
    untied.save_pretrained(tmp_path / "untied")
    _, head2 = load_target_rows(tmp_path / "untied")
    torch.testing.assert_close(head2, untied.lm_head.weight)

    draft = Eagle3Draft(Eagle3Config.from_target_config(tiny_target_config(), 3))
    d2t = torch.tensor([5, 9, 100])  # draft ids 0,1,2 -> target ids 5, 10, 102
    t2d = torch.zeros(120, dtype=torch.bool)
    t2d[[5, 10, 102]] = True
    draft.set_vocab(d2t, t2d)
    draft.init_from_target(embed, head2)
    assert draft.to_target_ids(torch.tensor([0, 1, 2])).tolist() == [5, 10, 102]
    torch.testing.assert_close(draft.lm_head.weight, head2[[5, 10, 102]])
