"""EAGLE-3 chain drafting on a tiny random Llama: lossless with a random and a (briefly) trained
draft, the draft cache mirrors the committed text, and an exported dir decodes identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specctl.draft.eagle3 import DraftCache, Eagle3Config, Eagle3Draft
from specctl.draft.vocab import build_mapping
from specctl.evaluate.drafters import Eagle3Drafter, HybridDrafter, PromptLookupDrafter
from specctl.evaluate.specdec import CostModel, Proposal, speculative_decode, target_decode
from specctl.evaluate.verifier import Verifier

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

V, PROMPT, NEW = 256, 8, 40


@pytest.fixture(scope="module")
def setup() -> dict:
    """Tiny target, its greedy texts, a random draft and a draft trained 60 steps on those texts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specctl.target.capture import HiddenCapture
    from specctl.train.objective import TargetHead, ttt_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    target = LlamaForCausalLM(cfg).eval()
    ver = Verifier(target)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (PROMPT,), generator=g) for _ in range(12)]
    refs = [target_decode(ver, p, max_new_tokens=NEW).tokens for p in prompts]
    ids = torch.stack([torch.cat([p, torch.tensor(r)]) for p, r in zip(prompts, refs, strict=True)])
    mask = torch.zeros_like(ids)
    mask[:, PROMPT:] = 1
    with torch.no_grad(), HiddenCapture(target, ver.aux_layers) as cap:
        target.model(input_ids=ids)
    dcfg = Eagle3Config.from_target_config(cfg.to_dict(), draft_vocab_size=128)
    m = build_mapping(torch.bincount(ids[:, PROMPT:].flatten(), minlength=V), 128)

    def new_draft() -> Eagle3Draft:
        d = Eagle3Draft(dcfg)
        d.set_vocab(m.d2t, m.t2d)
        d.init_from_target(
            target.model.embed_tokens.weight.detach(), target.lm_head.weight.detach()
        )
        return d

    torch.manual_seed(1)
    random_draft, trained = new_draft().eval(), new_draft()
    head = TargetHead(target.lm_head.weight.detach(), m.t2d)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=3e-3)
    aux, last = torch.cat(cap.aux, -1), cap.last
    for _ in range(60):
        loss = ttt_loss(trained, head, ids, mask, aux, last, ttt_length=4).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {
        "ver": ver,
        "prompts": prompts,
        "refs": refs,
        "random": random_draft,
        "trained": trained.eval(),
        "target": target,
    }


def _run(s: dict, draft: Eagle3Draft, k: int = 4, pad: bool = True) -> tuple[float, list]:
    emitted = rounds = 0
    outs = []
    for p, ref in zip(s["prompts"], s["refs"], strict=True):
        res = speculative_decode(
            s["ver"], Eagle3Drafter(draft), p, k=k, max_new_tokens=NEW, pad_verify=pad
        )
        assert res.tokens == ref  # lossless
        emitted, rounds = emitted + sum(res.emitted), rounds + res.rounds
        outs.append(res.emitted)
    return emitted / rounds, outs


def test_random_draft_is_lossless_and_accepts_little(setup: dict) -> None:
    al, _ = _run(setup, setup["random"])
    assert 1.0 <= al < 1.3


@pytest.mark.parametrize(("k", "pad"), [(4, True), (6, True), (3, False)])
def test_trained_draft_is_lossless_and_accepts(setup: dict, k: int, pad: bool) -> None:
    al, _ = _run(setup, setup["trained"], k=k, pad=pad)
    assert al > 1.5  # the accept paths (n > 0) really run


class CheckedDrafter(Eagle3Drafter):
    """At every proposal, the incremental draft state equals a from-scratch draft prefill."""

    def __init__(self, draft: Eagle3Draft, target, prompt: torch.Tensor) -> None:
        super().__init__(draft)
        self.target, self.text, self.checks = target, prompt.tolist(), 0

    def start(self, prompt, aux, first) -> None:
        self.text.append(first)
        super().start(prompt, aux, first)

    def advance(self, tokens, aux) -> None:
        self.text.extend(tokens.tolist())
        super().advance(tokens, aux)

    def propose(self, k, temperature, gen):
        from specctl.draft.eagle3 import DraftCache
        from specctl.target.capture import HiddenCapture

        ids = torch.tensor(self.text)  # x_0..x_L
        with torch.no_grad(), HiddenCapture(self.target, [1, 3, 4]) as cap:
            self.target.model(input_ids=ids[None, :-1])
        aux = torch.cat(cap.aux, -1)  # g_0..g_{L-1}
        with torch.no_grad():
            logits, _ = self.draft.decode(
                ids[None, 1:],
                self.draft.combine(aux),
                torch.arange(ids.numel() - 1)[None],
                DraftCache(),
            )
        assert self.cache.length == ids.numel() - 1
        assert torch.allclose(logits[0, -1], self._logits, atol=1e-4)
        self.checks += 1
        return super().propose(k, temperature, gen)


def test_draft_cache_mirrors_committed_text(setup: dict) -> None:
    for p, ref in list(zip(setup["prompts"], setup["refs"], strict=True))[:3]:
        d = CheckedDrafter(setup["trained"], setup["target"], p)
        res = speculative_decode(setup["ver"], d, p, k=4, max_new_tokens=NEW)
        assert res.tokens == ref and d.checks == res.rounds and max(res.accepted) > 0


def test_exported_dir_gives_same_acceptance(setup: dict, tmp_path: Path) -> None:
    from specctl.export.io import load_draft, read_draft_dir, write_dir
    from specctl.export.serving import export_draft

    draft = setup["trained"]
    write_dir(tmp_path / "ckpt", draft.cfg.to_dict(), dict(draft.state_dict()))
    export_draft(tmp_path / "ckpt", "sglang", tmp_path / "served")
    embed = setup["target"].get_input_embeddings().weight.detach()
    served = load_draft(read_draft_dir(tmp_path / "served"), embed=embed)
    al_a, per_a = _run(setup, draft)
    al_b, per_b = _run(setup, served)
    assert per_a == per_b and al_a == al_b


def test_tree_mask_matches_separate_chains(setup: dict) -> None:
    """Two sibling branches verified together give the logits of each branch run alone."""
    ver, p = setup["ver"], setup["prompts"][0]
    ver.reset()
    ver.forward(p)
    a, b, c = 11, 22, 33
    # root r; children a, b; c under a. rows: r, a, b, c
    vis = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    tree, _ = ver.forward(torch.tensor([7, a, b, c]), depth=torch.tensor([0, 1, 1, 2]), visible=vis)
    ver.crop(4)
    chain1, _ = ver.forward(torch.tensor([7, a, c]))
    ver.crop(3)
    chain2, _ = ver.forward(torch.tensor([7, b]))
    assert torch.allclose(tree[[0, 1, 3]], chain1, atol=1e-5)
    assert torch.allclose(tree[2], chain2[1], atol=1e-5)


@pytest.mark.parametrize("path", [[0, 2, 4], [0, 1], [0]])
def test_keep_leaves_the_committed_cache_and_the_accepted_path(setup: dict, path: list) -> None:
    ver, p = setup["ver"], setup["prompts"][0]
    ver.reset()
    ver.forward(p)
    start = ver.length
    ver.forward(torch.tensor([7, 11, 22, 33, 44]))  # a verify of root + 4 nodes
    before = [(layer.keys.clone(), layer.values.clone()) for layer in ver.cache.layers]
    rows = torch.tensor(path)
    ver.keep(start, rows)
    assert ver.length == start + len(path)
    for (k, v), layer in zip(before, ver.cache.layers, strict=True):
        assert torch.equal(layer.keys, torch.cat([k[:, :, :start], k[:, :, start + rows]], 2))
        assert torch.equal(layer.values, torch.cat([v[:, :, :start], v[:, :, start + rows]], 2))


@pytest.mark.parametrize("draft", ["random", "trained"])
def test_tree_is_lossless(setup: dict, draft: str) -> None:
    from specctl.evaluate.tree import Eagle3TreeDrafter, tree_decode

    emitted = rounds = 0
    for p, ref in zip(setup["prompts"], setup["refs"], strict=True):
        d = Eagle3TreeDrafter(setup[draft], topk=3, budget=7)
        res = tree_decode(setup["ver"], d, p, depth=4, max_new_tokens=NEW)
        assert res.tokens == ref
        emitted, rounds = emitted + sum(res.emitted), rounds + res.rounds
    if draft == "trained":
        assert emitted / rounds > 1.5


def test_tree_of_one_branch_is_the_chain(setup: dict) -> None:
    from specctl.evaluate.tree import Eagle3TreeDrafter, tree_decode

    _, chain = _run(setup, setup["trained"], k=4)
    tree = [
        tree_decode(
            setup["ver"],
            Eagle3TreeDrafter(setup["trained"], topk=1, budget=4),
            p,
            depth=4,
            max_new_tokens=NEW,
        ).emitted
        for p in setup["prompts"]
    ]
    assert tree == chain


@pytest.mark.parametrize("draft", ["random", "trained"])
def test_cost_aware_tree_keeps_what_pays_and_stays_lossless(setup: dict, draft: str) -> None:
    """On a flat curve every node pays: the same trees as the fixed budget (it only stops
    growing where no deeper node could be kept). On a steep one nothing pays: no proposals.
    Where verifying more than 4 positions is dear it keeps 3 nodes (the tiny target's flat
    distributions make every confidence low). Greedy output is unchanged in all."""
    from specctl.evaluate.tree import Eagle3TreeDrafter, tree_decode

    curves = {
        "flat": CostModel((1.0,) * 8, (2, 3, 4, 5, 6, 7, 8), step=0.0),
        "steep": CostModel(tuple(float(q) for q in range(1, 9)), (2, 3, 4, 5, 6, 7, 8)),
        "knee": CostModel((1.0,) * 4 + (1.5,) * 4, (4, 8), step=0.0),  # 4 positions free
    }

    def run(cost: CostModel | None) -> list:
        out = []
        for p, ref in zip(setup["prompts"], setup["refs"], strict=True):
            d = Eagle3TreeDrafter(setup[draft], topk=3, budget=7)
            d.cost = cost
            res = tree_decode(setup["ver"], d, p, depth=4, max_new_tokens=NEW)
            assert res.tokens == ref
            out.append(res)
        return out

    fixed = run(None)
    runs = {name: run(cost) for name, cost in curves.items()}
    assert [r.emitted for r in runs["flat"]] == [r.emitted for r in fixed]
    proposed = {
        name: sum(sum(r.proposed) for r in rs) for name, rs in [("fixed", fixed), *runs.items()]
    }
    assert proposed["steep"] == 0 and 0 < proposed["knee"] < proposed["fixed"], proposed


def _median_confidence(s: dict, draft: Eagle3Draft) -> float:
    """Between the two middle top-1 probabilities after each prompt: a threshold that must cut
    (and never ties with a confidence, which rounding could flip)."""
    confs = []
    for p in s["prompts"]:
        s["ver"].reset()
        logits, aux = s["ver"].forward(p, aux=True)
        d = Eagle3Drafter(draft)
        d.start(p, aux, int(logits[-1].argmax()))
        confs.append(float(torch.softmax(d._logits, -1).max()))
    confs.sort()
    return (confs[len(confs) // 2 - 1] + confs[len(confs) // 2]) / 2


@pytest.mark.parametrize("draft", ["random", "trained"])
def test_adaptive_k_is_lossless(setup: dict, draft: str) -> None:
    """Adaptive k with padded verify (and q=1 rounds when nothing is proposed) keeps greedy text."""
    threshold = _median_confidence(setup, setup[draft])
    ks: list[int] = []
    for p, ref in zip(setup["prompts"], setup["refs"], strict=True):
        d = Eagle3Drafter(setup[draft], adaptive_threshold=threshold)
        res = speculative_decode(setup["ver"], d, p, k=4, max_new_tokens=NEW)
        assert res.tokens == ref
        assert all(a <= k for a, k in zip(res.accepted, res.proposed, strict=True))
        ks += res.proposed
    assert max(ks) <= 4 and 0 in ks  # rounds with no proposal take the q=1 path
    assert max(ks) > 0  # ... and others draft: the cut really varies k


@pytest.mark.parametrize("draft", ["random", "trained"])
def test_adaptive_proposal_is_a_prefix_of_the_full_chain(setup: dict, draft: str) -> None:
    """The cut only shortens the chain: same tokens, and the confidence rule decides where."""
    ver, d = setup["ver"], setup[draft]
    thr = _median_confidence(setup, d)
    for p in setup["prompts"][:6]:
        ver.reset()
        logits, aux = ver.forward(p, aux=True)
        first = int(logits[-1].argmax())
        full, cut = Eagle3Drafter(d), Eagle3Drafter(d, adaptive_threshold=thr)
        full.start(p, aux, first)
        cut.start(p, aux, first)
        a, b = full.propose(4, 0.0, None).tokens, cut.propose(4, 0.0, None).tokens
        assert torch.equal(a[: b.numel()], b)
        # recompute the cut: cumulative top-1 probability of the full chain
        cache, x = DraftCache(), torch.cat([p[1:], torch.tensor([first])])
        conf, want = 1.0, 0
        with torch.no_grad():
            lg, h = d.decode(x[None], d.combine(aux[None]), torch.arange(x.numel())[None], cache)
            for j in range(4):
                conf *= float(torch.softmax(lg[0, -1], -1).max())
                if conf < thr:
                    break
                want = j + 1
                pos = torch.tensor([[x.numel() + j]])
                lg, h = d.decode(a[j : j + 1][None], h[:, -1:], pos, cache)
        assert b.numel() == want


def test_adaptive_sampling_runs(setup: dict) -> None:
    g = torch.Generator().manual_seed(0)
    for p in setup["prompts"][:4]:
        d = Eagle3Drafter(setup["trained"], adaptive_threshold=0.01)
        res = speculative_decode(
            setup["ver"], d, p, k=4, max_new_tokens=NEW, temperature=0.8, gen=g
        )
        assert len(res.tokens) == NEW and min(res.proposed) >= 0


class _Tracking(HybridDrafter):
    """Records which drafter proposed each round."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.used: list[str] = []

    def propose(self, k, temperature, gen):
        out = super().propose(k, temperature, gen)
        looked = self.lookup.propose(k, temperature, gen)
        self.used.append("lookup" if looked.tokens.numel() else "draft")
        return out


@pytest.mark.parametrize("min_ngram", [1, 2])
def test_hybrid_is_lossless_and_uses_both(setup: dict, min_ngram: int) -> None:
    """Lookup proposes where an n-gram repeats, the draft elsewhere; greedy text unchanged."""
    used: list[str] = []
    for p, ref in zip(setup["prompts"], setup["refs"], strict=True):
        d = _Tracking(PromptLookupDrafter(min_ngram=min_ngram), Eagle3Drafter(setup["trained"]))
        res = speculative_decode(setup["ver"], d, p, k=4, max_new_tokens=NEW)
        assert res.tokens == ref
        used += d.used
    assert "lookup" in used and "draft" in used
    assert d.name == "eagle3+lookup"


def test_hybrid_cache_mirrors_committed_text(setup: dict) -> None:
    """The draft's cache follows the text even after rounds where lookup proposed."""
    for p, ref in list(zip(setup["prompts"], setup["refs"], strict=True))[:3]:
        checked = CheckedDrafter(setup["trained"], setup["target"], p)
        d = HybridDrafter(PromptLookupDrafter(), checked)
        res = speculative_decode(setup["ver"], d, p, k=4, max_new_tokens=NEW)
        assert res.tokens == ref


def test_hybrid_sampling_runs(setup: dict) -> None:
    g = torch.Generator().manual_seed(0)
    for p in setup["prompts"][:4]:
        d = HybridDrafter(PromptLookupDrafter(), Eagle3Drafter(setup["trained"]))
        res = speculative_decode(
            setup["ver"], d, p, k=4, max_new_tokens=NEW, temperature=0.8, gen=g
        )
        assert len(res.tokens) == NEW and min(res.proposed) >= 0


def test_hybrid_with_learned_lookup_confidence_is_lossless(setup: dict) -> None:
    ver = setup["ver"]
    for p, ref in zip(setup["prompts"], setup["refs"], strict=True):
        d = HybridDrafter(
            PromptLookupDrafter(learn_confidence=True), Eagle3Drafter(setup["trained"])
        )
        for cost in (None, CostModel.of(ver)):
            d.cost = cost
            res = speculative_decode(ver, d, p, k=4, max_new_tokens=NEW)
            assert res.tokens == ref


def test_learned_confidence_lets_an_underconfident_draft_propose(setup: dict) -> None:
    """The tiny trained draft is right far more often than its ~1/128 top-1 probability says:
    the cost model alone never lets it propose; learned from the rounds verified so far, its
    confidence does, across prompts, and greedy output is still the target's."""
    ver = setup["ver"]
    plain, learned = (
        Eagle3Drafter(setup["trained"]),
        Eagle3Drafter(setup["trained"], None, 0.0, True),
    )
    runs: dict[str, list] = {"plain": [], "learned": []}
    for d, name in ((plain, "plain"), (learned, "learned")):
        d.cost = CostModel.of(ver)
        for p, ref in zip(setup["prompts"], setup["refs"], strict=True):
            res = speculative_decode(ver, d, p, k=4, max_new_tokens=NEW)
            assert res.tokens == ref
            runs[name].append(res)
    al = {n: sum(sum(r.emitted) for r in rs) / sum(r.rounds for r in rs) for n, rs in runs.items()}
    assert al["plain"] == 1.0 and al["learned"] > 1.4
    assert learned.calibration is not None and learned.calibration(0.01) > 0.5


@pytest.mark.parametrize("draft", ["random", "trained"])
def test_cost_aware_chain_is_the_best_prefix_and_lossless(setup: dict, draft: str) -> None:
    """With a cost model the chain is the best-rate prefix of the full one: all of it on a
    flat curve, none of it on a steep one (this tiny draft's confidences are ~1/128: it is
    not calibrated like a real draft), and greedy output never changes."""
    ver, d = setup["ver"], setup[draft]
    flat = CostModel((1.0,) * 5, (2, 3, 4, 5), step=0.0)
    steep = CostModel((1.0, 2.0, 3.0, 4.0, 5.0), (2, 3, 4, 5), step=0.0)
    for p, ref in zip(setup["prompts"], setup["refs"], strict=True):
        ver.reset()
        logits, aux = ver.forward(p, aux=True)
        first = int(logits[-1].argmax())
        full = Eagle3Drafter(d)
        full.start(p, aux, first)
        a = full.propose(4, 0.0, None)
        for cost, want in ((flat, 4), (steep, 0)):
            cut = Eagle3Drafter(d)
            cut.cost = cost
            cut.start(p, aux, first)
            b = cut.propose(4, 0.0, None)
            assert b.tokens.numel() == want == cost.best_length(a.conf or [])
            assert torch.equal(a.tokens[:want], b.tokens)
        for cost in (flat, steep, CostModel.of(ver)):
            cut.cost = cost
            assert speculative_decode(ver, cut, p, k=4, max_new_tokens=NEW).tokens == ref


class CheckedNapper(CheckedDrafter):
    """CheckedDrafter's from-scratch check at every round the draft is awake, after it has
    read the tokens queued while it slept."""

    def propose(self, k, temperature, gen):
        if self._asleep:
            return Eagle3Drafter.propose(self, k, temperature, gen)
        if self._queued:
            with torch.inference_mode():
                self._wake()
        return super().propose(k, temperature, gen)


def test_a_draft_that_cannot_pay_naps_and_stays_lossless(setup: dict) -> None:
    """On a steep cost curve the chain never proposes: the draft naps (asleep it reads
    nothing), greedy output stays the target's, and each time it wakes its state equals a
    from-scratch prefill of the committed text (the queued tokens are read in order)."""
    steep = CostModel((1.0, 2.0, 3.0, 4.0, 5.0), (2, 3, 4, 5), step=0.0)
    for p, ref in list(zip(setup["prompts"], setup["refs"], strict=True))[:3]:
        d = CheckedNapper(setup["trained"], setup["target"], p)
        d.cost = steep
        res = speculative_decode(setup["ver"], d, p, k=4, max_new_tokens=NEW)
        assert res.tokens == ref and sum(res.proposed) == 0
        assert d.naps >= res.rounds // 2 and d.checks + d.naps == res.rounds  # mostly asleep
        assert d.checks >= 4  # ... but it woke up and was checked several times


def test_a_draft_that_proposes_never_naps(setup: dict) -> None:
    ver = setup["ver"]
    flat = CostModel((1.0,) * 5, (2, 3, 4, 5), step=0.0)  # every token is worth proposing
    d = Eagle3Drafter(setup["trained"])
    d.cost = flat
    for p, ref in zip(setup["prompts"][:4], setup["refs"][:4], strict=True):
        res = speculative_decode(ver, d, p, k=4, max_new_tokens=NEW)
        assert res.tokens == ref and min(res.proposed) > 0
    assert d.naps == 0


class _FixedLookup:
    """A lookup stand-in proposing fixed guesses with fixed confidences."""

    def __init__(self, tokens: list[int], conf: list[float]) -> None:
        self.tokens, self.conf = tokens, conf

    def propose(self, k: int, temperature: float, gen: object) -> Proposal:
        return Proposal(tokens=torch.tensor(self.tokens[:k], dtype=torch.long), conf=self.conf[:k])


def _grafted(tokens: list[int], conf: list[float], budget: int = 7, cost=None):
    """The draft grew root -> 10 (p .6) -> 11 (.3), root -> 20 (.2); lookup guesses `tokens`."""
    from specctl.evaluate.tree import Eagle3TreeLookupDrafter, _Grown

    class Fixed(Eagle3TreeLookupDrafter):
        def _grow(self, depth: int) -> _Grown:
            return _Grown([10, 20, 11], [0.6, 0.2, 0.3], [-1, -1, 0], [1, 1, 2], [0, 2, 1], 2)

    d = Fixed.__new__(Fixed)  # no draft model: only the grafting runs
    d.budget, d.cost, d.lookup = budget, cost, _FixedLookup(tokens, conf)
    tree = d.propose_tree(4)
    paths = []
    for i in range(tree.tokens.numel()):
        path, j = [], i
        while j >= 0:
            path.insert(0, int(tree.tokens[j]))
            j = int(tree.parents[j])
        paths.append(tuple(path))
    return set(paths), tree


def test_lookup_follows_the_draft_where_they_agree_and_branches_where_not() -> None:
    paths, tree = _grafted([10, 12, 13], [0.7, 0.5, 0.4])
    # the shared first guess, the draft's second guess and lookup's branch off it
    assert paths == {(10,), (20,), (10, 11), (10, 12), (10, 12, 13)}
    assert all(int(p) < i for i, p in enumerate(tree.parents.tolist()))  # parents first
    # a budget keeps the likeliest: 10 (.7), 12 (.5), 13 (.4); 11 shares what 12 leaves:
    # .3 * (1 - .5 / .7) = .086, below 20 (.2)
    paths, _ = _grafted([10, 12, 13], [0.7, 0.5, 0.4], budget=4)
    assert paths == {(10,), (10, 12), (10, 12, 13), (20,)}


def test_lookup_branch_at_the_root_and_the_cost_cut() -> None:
    paths, _ = _grafted([30, 31], [0.9, 0.8])
    # lookup's .9 at the root leaves the draft's first guesses a tenth of their chance
    assert paths == {(30,), (30, 31), (10,), (20,), (10, 11)}
    steep = CostModel(tuple(1.0 + 0.4 * q for q in range(8)), (2, 3, 4, 5, 6, 7, 8), step=0.0)
    paths, _ = _grafted([30, 31], [0.9, 0.8], cost=steep)
    assert paths == {(30,), (30, 31)}  # only lookup's sure guesses pay their verify


@pytest.mark.parametrize("draft", ["random", "trained"])
def test_tree_with_lookup_is_lossless_and_grafts(setup: dict, draft: str) -> None:
    from specctl.evaluate.tree import Eagle3TreeLookupDrafter, tree_decode

    ver, grafted = setup["ver"], 0
    for cost in (None, CostModel.of(ver)):
        for p, ref in zip(setup["prompts"], setup["refs"], strict=True):
            lookup = PromptLookupDrafter(learn_confidence=True)
            d = Eagle3TreeLookupDrafter(setup[draft], None, lookup, topk=3, budget=7)
            d.cost = cost
            res = tree_decode(ver, d, p, depth=4, max_new_tokens=NEW)
            assert res.tokens == ref
            grafted += sum(sum(t) for t in lookup._tried.values())  # rounds lookup guessed in
    assert grafted > 0
