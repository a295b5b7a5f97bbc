"""Records -> batches (dir mode), plus `make_target` / `make_records`, shared by train tests.

Records come from a real tiny random Llama target, packed with `specctl.pack.pack_record`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specctl.errors import InputError
from specctl.train.data import DirSource, collate, is_heldout, load_batch, read_record

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    max_position_embeddings=256,
    initializer_range=0.4,
)


def make_target(
    path: Path, seed: int = 0, position_wise: bool = False, **overrides: object
) -> Path:
    """A tiny random Llama saved as an HF folder. `position_wise` zeroes every o_proj, so
    the target's next-token distribution depends on the current token only: a signal a
    draft learns in a few hundred steps (a fully random target is learnable only slowly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    if position_wise:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
    model.save_pretrained(path)
    return path


@torch.no_grad()
def make_records(
    target: Path,
    out: Path,
    n: int,
    T: int = 24,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    num_aux: int = 3,
    epoch: int = 0,
) -> list[Path]:
    """n records {epoch}_{index}.rec: random prompts, the target's greedy continuation as answer."""
    from transformers import LlamaForCausalLM

    from specctl.pack import pack_record

    model = LlamaForCausalLM.from_pretrained(target).eval()
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    prompt_len = T // 3
    prompts = torch.randint(0, model.config.vocab_size, (n, prompt_len), generator=g)
    seqs = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=T - prompt_len,
        min_new_tokens=T - prompt_len,
        pad_token_id=0,
    )
    hs = model(seqs, output_hidden_states=True).hidden_states  # L+1 x [n, T, H]
    n_layers = model.config.num_hidden_layers
    layers = [max(0, n_layers - 3), n_layers - 2, n_layers - 1][:num_aux]
    for i in range(n):
        mask = torch.zeros(T, dtype=torch.uint8)
        mask[prompt_len:] = 1  # the answer is the assistant turn
        rec = pack_record(
            epoch=epoch,
            index=i,
            input_ids=seqs[i].to(torch.int32),
            loss_mask=mask,
            aux_hidden=[hs[j][i] for j in layers],
            last_hidden=hs[-1][i],
            dtype=dtype,
        )
        p = out / f"{epoch}_{i}.rec"
        p.write_bytes(rec.numpy().tobytes())
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def recs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    target = make_target(root / "target")
    make_records(target, root / "recs", 20, T=12)
    return target, root / "recs"


@pytest.mark.unit
def test_dir_source_order_ranks_and_heldout(recs: tuple[Path, Path]) -> None:
    _, d = recs
    src = DirSource(d, 32, 3, heldout=0.2, max_heldout=64)
    held = {s for s, _ in src.heldout}
    assert held == {(0, i) for i in range(20) if is_heldout((0, i), 0.2)}
    assert held and len(src.train) == 20 - len(held)
    train_ids = [s for s, _ in src.train]
    assert train_ids == sorted(train_ids)
    # world 2, batch 2, accum 1: rank slices of each block of 4, disjoint, in global order
    r0 = list(src.steps(set(), 0, 2, 2, 1))
    r1 = list(src.steps(set(), 1, 2, 2, 1))
    one = list(src.steps(set(), 0, 1, 4, 1))
    assert len(r0) == len(r1) == len(one) == len(src.train) // 4
    for a, b, c in zip(r0, r1, one, strict=True):
        assert [s for s, _ in a[0] + b[0]] == [s for s, _ in c[0]]
    # trained ids are skipped: resuming continues with the next untrained block
    done = {s for s, _ in one[0][0]}
    assert [s for s, _ in next(iter(src.steps(done, 0, 1, 4, 1)))[0]] == [s for s, _ in one[1][0]]


@pytest.mark.unit
def test_collate_pads_right_and_copies(recs: tuple[Path, Path]) -> None:
    _, d = recs
    files = sorted(d.glob("*.rec"))[:2]
    r = read_record(files[0])
    b = load_batch([((0, 0), files[0]), ((0, 1), files[1])], 32, 3)
    assert b.input_ids.shape == (2, 12) and b.aux.shape == (2, 12, 96)
    assert b.last_hidden.shape == (2, 12, 32) and b.tokens == 24
    assert torch.equal(b.input_ids[0], r.input_ids.long())
    short = collate([r, _truncated(r, 5)], [(0, 0), (0, 9)])
    assert short.input_ids.shape == (2, 12) and short.lengths == [12, 5]
    assert short.loss_mask[1, 5:].sum() == 0 and short.aux[1, 5:].abs().sum() == 0


def _truncated(r, t: int):  # type: ignore[no-untyped-def]
    from specctl.pack import pack_record, unpack_record

    k = r.aux_hidden.shape[1] // r.last_hidden.shape[1]
    return unpack_record(
        pack_record(
            epoch=0,
            index=9,
            input_ids=r.input_ids[:t],
            loss_mask=r.loss_mask[:t],
            aux_hidden=r.aux_hidden[:t],
            last_hidden=r.last_hidden[:t],
            num_aux=k,
        )
    )


@pytest.mark.unit
def test_dimension_mismatch_is_one_line(recs: tuple[Path, Path], tmp_path: Path) -> None:
    _, d = recs
    with pytest.raises(InputError, match="H=32, 3 aux layers; the target config says H=64"):
        DirSource(d, 64, 3, 0.0, 0)
    with pytest.raises(InputError, match="3 aux layers; the target config says H=32, 4 aux"):
        DirSource(d, 32, 4, 0.0, 0)
    with pytest.raises(InputError, match=r"no \*\.rec record files"):
        DirSource(tmp_path, 32, 3, 0.0, 0)
