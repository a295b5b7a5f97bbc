"""`--draft mlp` training pieces: the objective's alignment against a naive loop, learning on a
tiny random target, `--features last` records (round trip, collate, EAGLE-3 refusal)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specctl.draft.mlp import MLPSpeculator, MLPSpeculatorConfig
from specctl.errors import InputError, UsageError
from specctl.pack import pack_record, record_nbytes, unpack_record
from specctl.train.data import check_record, collate, load_batch
from specctl.train.mlp_objective import mlp_loss
from specctl.train.objective import TargetHead
from specctl.train.run_config import MLPOptions, TrainDraftConfig
from tests.unit.test_train_data import make_records, make_target

pytestmark = pytest.mark.unit


def _head(weight: torch.Tensor) -> TargetHead:
    return TargetHead(weight, torch.ones(weight.shape[0], dtype=torch.bool))


@torch.no_grad()
def test_objective_matches_a_naive_loop() -> None:
    torch.manual_seed(0)
    v, h, b, t, n = 13, 8, 2, 7, 3
    draft = MLPSpeculator(MLPSpeculatorConfig(emb_dim=h, vocab_size=v, n_predict=n)).double()
    target_w = torch.randn(v, h, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t))
    mask = (torch.rand(b, t) > 0.3).to(torch.uint8)
    last = torch.randn(b, t, h, dtype=torch.float64)
    weights = [1.0, 0.5, 0.25]
    r = mlp_loss(draft, _head(target_w), ids, mask, last, weights)
    # naive: row (j, s), head i consumes x_{s+1+i}, scored vs softmax(W h[s+1+i]) if masked
    loss, sums, hits = 0.0, [0.0] * n, [0] * n
    for i in range(n):
        for j in range(b):
            for s in range(t):
                p = s + 1 + i
                if p >= t or not mask[j, p]:
                    continue
                toks = [int(ids[j, s + 1 + m]) if s + 1 + m < t else 0 for m in range(n)]
                logits = draft(last[j : j + 1, s : s + 1], torch.tensor([toks]))[i, 0, 0]
                target = torch.softmax(target_w @ last[j, p], -1)
                ce = float(-(target * torch.log_softmax(logits, -1)).sum())
                sums[i] += ce
                hits[i] += int(logits.argmax() == target.argmax())
        loss += weights[i] * sums[i] / max(1, int(mask[:, i + 1 :].sum()))
    torch.testing.assert_close(r.loss_sum, torch.tensor(sums, dtype=r.loss_sum.dtype))
    assert r.hits.tolist() == hits
    assert float(r.loss) == pytest.approx(loss)
    assert r.count.tolist() == [float(mask[:, i + 1 :].sum()) for i in range(n)]


@torch.no_grad()
def test_bf16_head_products_reach_the_mlp_heads() -> None:
    """mm_dtype=bf16 (train-draft's head_matmul) runs the MLP heads' own products in bf16,
    not only the target distribution. Here the distribution stays float64 (mm_weight is the
    float64 weight), so any change in the loss comes from the heads' products alone."""
    torch.manual_seed(0)
    v, h, b, t, n = 96, 32, 2, 9, 3
    draft = MLPSpeculator(MLPSpeculatorConfig(emb_dim=h, vocab_size=v, n_predict=n)).double()
    w, last = torch.randn(v, h, dtype=torch.float64), torch.randn(b, t, h, dtype=torch.float64)
    ids, mask = torch.randint(0, v, (b, t)), torch.ones(b, t, dtype=torch.uint8)
    exact = mlp_loss(draft, _head(w), ids, mask, last, [1.0] * n)
    head = _head(w)
    head.mm_dtype = torch.bfloat16
    bf16 = mlp_loss(draft, head, ids, mask, last, [1.0] * n)
    gap = abs(float(bf16.loss) - float(exact.loss)) / float(exact.loss)
    assert 1e-6 < gap < 2e-2, gap


def test_heads_learn_on_a_tiny_target(tmp_path: Path, one_torch_thread: None) -> None:
    target = make_target(tmp_path / "target", position_wise=True)
    files = make_records(target, tmp_path / "recs", 16, T=16, num_aux=0)
    batch = load_batch([((0, i), f) for i, f in enumerate(files)], 32, 0)  # last only
    assert batch.aux.shape == (16, 16, 0)
    from safetensors.torch import load_file

    w = load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"]  # tied
    torch.manual_seed(0)
    draft = MLPSpeculator(MLPSpeculatorConfig(emb_dim=32, vocab_size=96, n_predict=3))
    draft.init_from_target(w, w)
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    ids, mask, last = batch.input_ids, batch.loss_mask, batch.last_hidden.float()
    curve = []
    for _ in range(60):
        r = mlp_loss(draft, _head(w), ids, mask, last, [1.0, 1.0, 1.0])
        opt.zero_grad()
        r.loss.backward()
        opt.step()
        curve.append((float(r.loss.detach()), (r.hits / r.count).tolist()))
    (loss0, acc0), (loss1, acc1) = curve[0], curve[-1]
    assert loss1 < 0.6 * loss0, (loss0, loss1)
    assert acc1[0] > acc0[0] + 0.3 and acc1[0] > 0.6, (acc0, acc1)
    assert acc1[2] > acc0[2], (acc0, acc1)


def test_features_last_records_round_trip_and_refusal(tmp_path: Path) -> None:
    t, h = 7, 16
    ids = torch.arange(t, dtype=torch.int32)
    mask = torch.ones(t, dtype=torch.uint8)
    last = torch.randn(t, h)
    buf = pack_record(
        epoch=1, index=2, input_ids=ids, loss_mask=mask, aux_hidden=None, last_hidden=last
    )
    rec = unpack_record(bytearray(buf.numpy().tobytes()), verify=True)
    assert not rec.header.has_aux and rec.aux_hidden is None and rec.header.num_aux == 0
    torch.testing.assert_close(rec.last_hidden.float(), last.to(torch.bfloat16).float())
    # a quarter of EAGLE-3's bytes per token (H instead of 4H) at realistic sizes
    ratio = record_nbytes(512, 576, 0, torch.bfloat16) / record_nbytes(512, 576, 3, torch.bfloat16)
    assert 0.24 < ratio < 0.26
    b = collate([rec], [(1, 2)], with_aux=True)  # records without aux: empty aux either way
    assert b.aux.shape == (1, t, 0) and torch.equal(b.input_ids[0], ids.long())
    check_record(rec, h, 0, "r")  # the MLP trainer reads last_hidden only
    with pytest.raises(InputError, match="--features last"):
        check_record(rec, h, 3, "r")  # the EAGLE-3 trainer refuses in one line


def test_run_config_family_knobs() -> None:
    cfg = TrainDraftConfig(draft_family="mlp", n_predict=4)
    assert cfg.step_weights() == [1.0] * 4
    assert TrainDraftConfig(ttt_length=3, step_decay=0.5).step_weights() == [1.0, 0.5, 0.25]
    mlp = MLPOptions(head_weights=[1.0, 0.5])
    assert TrainDraftConfig(draft_family="mlp", n_predict=2, mlp=mlp).step_weights() == [1.0, 0.5]
    with pytest.raises(UsageError, match="head_weights"):
        TrainDraftConfig(draft_family="mlp", n_predict=3, mlp=mlp)
