"""Tree drafting, EAGLE-2 style (greedy only): the draft grows a tree of candidate continuations,
the target verifies the whole tree in ONE forward with an ancestry mask, and the longest path
that matches the target's argmax is emitted.

Growing: the root is the last committed token. At each depth the `topk` frontier nodes with
the highest cumulative draft log-probability (among the nodes that could still be kept) are
fed to the draft in one call (a tree mask lets each see only its ancestors) and each gets
`topk` children. Finally the `budget` best nodes by cumulative log-prob are kept; a child
never scores above its parent (log p <= 0, ties broken by depth), so the kept set is closed
under ancestors.

Cost-aware (eval-accept's default, `cost` set as for the chain): a node is accepted with
probability exp(its score) when the draft is calibrated, so the best n nodes are expected to
add the sum of those; the tree keeps the n (<= budget, possibly 0) with the most expected
emitted tokens per decode step on the verify curve (`CostModel.best_length`), and stops
growing once no node of the newest depth is among them (deeper nodes score lower still).
Where a verify of 8 positions costs two decode steps, a fixed budget of 7 cannot pay.

With prompt lookup (`Eagle3TreeLookupDrafter`, eval-accept's `eagle3-tree+lookup` row):
lookup's n-gram guesses are grafted onto the grown tree, sharing its nodes where they agree,
and the union is ranked and cut by the same rule.

Cache rules: the draft feeds tree nodes into its cache after the committed positions and
crops them before the accepted tokens are re-read with target states (as in chain mode); the
target keeps the committed cache plus the accepted path's rows (`Verifier.keep`).
Temperature > 0 would need multi-draft rejection sampling: not supported, the CLI refuses it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from specctl.draft.eagle3 import DraftCache
from specctl.evaluate.drafters import Eagle3Drafter, PromptLookupDrafter
from specctl.evaluate.specdec import DecodeResult, _pick, verify_len
from specctl.evaluate.verifier import Verifier


@dataclass
class Tree:
    """Nodes in depth order, so a parent always precedes its children."""

    tokens: torch.Tensor  # [N] target ids
    parents: torch.Tensor  # [N] index of the parent node, -1 = the root (last committed token)
    depth: torch.Tensor  # [N] 1..depth


def ancestry(parents: torch.Tensor) -> torch.Tensor:
    """parents [N] -> visible [N+1, N+1] bool over (root, nodes): ancestors and self."""
    n = parents.numel()
    vis = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    vis[0, 0] = True
    for i in range(n):
        vis[i + 1] = vis[int(parents[i]) + 1]
        vis[i + 1, i + 1] = True
    return vis


@dataclass
class _Grown:
    """A grown tree's nodes (index order: parents first) with each one's chance of being
    accepted (cumulative draft probability), the ones kept, and the draft steps taken."""

    tok: list[int]
    prob: list[float]
    parent: list[int]
    dep: list[int]
    best: list[int]
    steps: int

    def tree(self, keep: list[int]) -> Tree:
        """The kept nodes (closed under ancestors) as a Tree, parents before children."""
        order = sorted(keep, key=lambda i: (self.dep[i], i))
        index = {node: j for j, node in enumerate(order)}
        par = [index[self.parent[i]] if self.parent[i] >= 0 else -1 for i in order]
        return Tree(
            tokens=torch.tensor([self.tok[i] for i in order], dtype=torch.long),
            parents=torch.tensor(par, dtype=torch.long),
            depth=torch.tensor([self.dep[i] for i in order], dtype=torch.long),
        )

    def add(self, tok: int, parent: int, prob: float) -> int:
        self.tok.append(tok)
        self.prob.append(prob)
        self.parent.append(parent)
        self.dep.append(self.dep[parent] + 1 if parent >= 0 else 1)
        return len(self.tok) - 1

    def scale(self, node: int, factor: float) -> None:
        """Multiply a node's chance and its descendants' (they are conditioned on it)."""
        below = {node}
        for i in range(node, len(self.tok)):  # parents come before their children
            if i in below or self.parent[i] in below:
                below.add(i)
                self.prob[i] *= factor


class _MaskedCache(DraftCache):
    """A DraftCache whose next call attends with an explicit mask [n, length + n] when set."""

    mask: torch.Tensor | None = None

    def _mask(self, start: int, n: int, device: torch.device) -> torch.Tensor | None:
        return super()._mask(start, n, device) if self.mask is None else self.mask


class Eagle3TreeDrafter(Eagle3Drafter):
    name = "eagle3-tree"

    def __init__(
        self, draft: Any, aux_layers: list[int] | None = None, topk: int = 3, budget: int = 7
    ) -> None:
        super().__init__(draft, aux_layers, naps=False)  # cost-aware, it proposes 0 instead
        self.topk, self.budget = topk, budget

    def _new_cache(self) -> DraftCache:
        return _MaskedCache()

    def propose_tree(self, depth: int) -> Tree:
        grown = self._grow(depth)
        return grown.tree(grown.best)

    @torch.inference_mode()
    def _grow(self, depth: int) -> _Grown:
        keep = self.cache.length
        logp = torch.log_softmax(self._logits, -1).topk(self.topk)  # the root's children
        tok = [int(self._draft_to_target[i]) for i in logp.indices]
        score, parent, dep = logp.values.tolist(), [-1] * len(tok), [1] * len(tok)
        slot: dict[int, int] = {}  # node -> its cache slot (fed nodes only)
        hid: dict[int, torch.Tensor] = {-1: self._h[0, 0]}  # node -> h_out its children read
        frontier = list(range(len(tok)))
        best = self._best(score, dep, 1)
        steps = 1
        for d in range(2, depth + 1):
            # expand only frontier nodes among the best: a node ranked out now never gets back
            # in (nodes only join), nor do its children (they rank below it); none left (no
            # node of the newest depth is worth keeping): the tree is grown
            kept = set(best)
            feed = [i for i in sorted(frontier, key=lambda i: -score[i]) if i in kept]
            feed = feed[: self.topk]  # [E]
            if not feed:
                break
            base = self.cache.length
            vis = torch.zeros(len(feed), base + len(feed), dtype=torch.bool)
            vis[:, :keep] = True
            for j, node in enumerate(feed):
                a = parent[node]
                while a >= 0:  # fed ancestors
                    vis[j, slot[a]] = True
                    a = parent[a]
                vis[j, base + j] = True
                slot[node] = base + j
            self.cache.mask = vis
            ids = torch.tensor([[tok[i] for i in feed]])  # [1, E]
            hidden = torch.stack([hid[parent[i]] for i in feed])[None]  # [1, E, H]
            pos = torch.full((1, len(feed)), keep + d - 2)  # node at depth d-1 sits at keep+d-2
            lg, h = self.draft.decode(ids, hidden, pos, self.cache)  # [1,E,Vd], [1,E,H]
            self.cache.mask = None
            steps = d
            frontier = []
            for j, node in enumerate(feed):
                hid[node] = h[0, j]
                top = torch.log_softmax(lg[0, j].float(), -1).topk(self.topk)
                for lp, di in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    frontier.append(len(tok))
                    tok.append(int(self._draft_to_target[di]))
                    score.append(score[node] + lp)
                    parent.append(node)
                    dep.append(d)
            best = self._best(score, dep, d)
        self.cache.crop(keep)
        return _Grown(tok, [math.exp(x) for x in score], parent, dep, best, steps)

    def _best(self, score: list[float], dep: list[int], drafted: int) -> list[int]:
        """The nodes to keep, best first (highest cumulative log-prob, shallower on ties): the
        `budget` best without a cost model, else the prefix of them with the best rate."""
        ranked = self._ranked(score, dep, range(len(score)))
        return self._cut(ranked, [math.exp(score[i]) for i in ranked], drafted)

    def _ranked(self, key: list[float], dep: list[int], nodes: Iterable[int]) -> list[int]:
        """The `budget` best of `nodes` by `key` (cumulative log-prob or chance: the same
        order), shallower first on ties, so a parent always ranks before its children."""
        return sorted(nodes, key=lambda i: (-key[i], dep[i]))[: self.budget]

    def _cut(self, ranked: list[int], chance: list[float], drafted: int) -> list[int]:
        """All of `ranked` without a cost model, else the prefix with the best rate."""
        if self.cost is None:
            return ranked
        return ranked[: self.cost.best_length(chance, drafted)]


class Eagle3TreeLookupDrafter(Eagle3TreeDrafter):
    """The draft tree with prompt lookup's guesses grafted on, verified in the same forward.

    `HybridDrafter` (chains) must pick one proposal a round; a tree can hold both, and on this
    CPU's verify curve a few more positions cost little once a verify is paid for (q = 5 -> 6
    is ~0.03 decode steps). Lookup's guesses follow the draft's nodes while they agree and
    branch off where they differ. Each node's chance of acceptance: the draft's cumulative
    probability, lookup's learned confidence on its path (the larger where both guess the same
    token), and where lookup branches off, the draft's siblings share only what lookup leaves
    (they are alternatives to the same position). The best nodes by that chance, cut by the
    cost model as in the plain tree, are verified; the walk takes whichever branch the target
    agrees with, so greedy output stays the target's.
    """

    name = "eagle3-tree+lookup"

    def __init__(
        self,
        draft: Any,
        aux_layers: list[int] | None,
        lookup: PromptLookupDrafter,
        topk: int = 3,
        budget: int = 7,
    ) -> None:
        super().__init__(draft, aux_layers, topk, budget)
        self.lookup = lookup  # learns its confidence; its own cost stays None: cut here

    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        self.lookup.start(prompt, None, first)
        super().start(prompt, aux, first)

    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        self.lookup.advance(tokens, None)
        super().advance(tokens, aux)

    def propose_tree(self, depth: int) -> Tree:
        grown = self._grow(depth)
        found = self.lookup.propose(depth, 0.0, None)
        if not found.tokens.numel():
            return grown.tree(grown.best)
        # the draft's best before the cost cut: the union is cut below
        cands = set(self._ranked(grown.prob, grown.dep, range(len(grown.tok))))
        conf = found.conf or [0.5] * found.tokens.numel()  # nothing learned: the prior
        node, reach = -1, 1.0  # reach: the chance of getting to `node`
        for tok, c in zip(found.tokens.tolist(), conf, strict=True):
            kids = [i for i in range(len(grown.tok)) if grown.parent[i] == node]
            same = next((i for i in kids if grown.tok[i] == tok), None)
            if same is not None:
                grown.prob[same] = max(grown.prob[same], c)
                node = same
            else:
                if reach > 0:  # the draft's guesses here share what lookup leaves
                    left = max(0.0, 1.0 - c / reach)
                    for i in kids:
                        grown.scale(i, left)
                node = grown.add(tok, node, c)
            reach = grown.prob[node]
            cands.add(node)
        # parents never rank below their children (cumulative chances), so every prefix of
        # this order is a tree
        keep = self._ranked(grown.prob, grown.dep, cands)
        return grown.tree(self._cut(keep, [grown.prob[i] for i in keep], grown.steps))


def tree_decode(
    verifier: Verifier,
    drafter: Eagle3TreeDrafter,
    prompt: torch.Tensor,
    *,
    depth: int,
    max_new_tokens: int,
    eos_ids: tuple[int, ...] = (),
    pad_verify: bool = True,
) -> DecodeResult:
    """Greedy speculative decoding with a draft tree of `depth` levels (see module docstring)."""
    t0 = time.perf_counter()
    # 1. Prefill the target; it emits the first token; the draft reads the prompt.
    verifier.reset()
    logits, aux = verifier.forward(prompt, aux=True)  # [T, V], [T, k*H]
    out = [_pick(logits[-1], 0.0, None)]
    res = DecodeResult(tokens=out, prefill_s=time.perf_counter() - t0, total_s=0.0)
    t = time.perf_counter()
    drafter.start(prompt, aux, out[0])
    res.draft_s += time.perf_counter() - t
    while len(out) < max_new_tokens and out[-1] not in eos_ids:
        # 2. Grow the tree.
        t = time.perf_counter()
        tree = drafter.propose_tree(min(depth, max_new_tokens - len(out)))
        res.draft_s += time.perf_counter() - t
        # 3. Verify root + N nodes (+ padding that sees only the root) in ONE forward.
        t = time.perf_counter()
        n = tree.tokens.numel()
        q = verify_len(n + 1, pad_verify, verifier.verify_shapes)
        vis = torch.zeros(q, q, dtype=torch.bool)
        vis[: n + 1, : n + 1] = ancestry(tree.parents)  # [N+1, N+1]
        for r in range(n + 1, q):  # padding: sees the root and itself, at depth 1
            vis[r, 0] = vis[r, r] = True
        ids = torch.cat([torch.tensor([out[-1]]), tree.tokens, torch.full((q - n - 1,), out[-1])])
        offs = torch.cat([torch.tensor([0]), tree.depth, torch.ones(q - n - 1, dtype=torch.long)])
        start = verifier.length
        logits, aux = verifier.forward(ids, aux=True, depth=offs, visible=vis)  # [q, V], [q, k*H]
        res.verify_s += time.perf_counter() - t
        # 4. Walk down from the root while a child matches the target's argmax.
        target = logits.argmax(-1)  # [q]
        rows, node = [0], -1
        while True:
            kids = ((tree.parents == node) & (tree.tokens == target[rows[-1]])).nonzero()
            if not kids.numel():
                break
            node = int(kids[0])
            rows.append(node + 1)
        new = [*tree.tokens[[r - 1 for r in rows[1:]]].tolist(), int(target[rows[-1]])]
        # 5. Emit, stopping at the token budget or an EOS.
        new = new[: max_new_tokens - len(out)]
        stop = next((j for j, tok in enumerate(new) if tok in eos_ids), len(new) - 1)
        new = new[: stop + 1]
        out.extend(new)
        res.emitted.append(len(new))
        res.accepted.append(len(rows) - 1)
        res.proposed.append(int(tree.depth.max()) if n else 0)
        if len(out) >= max_new_tokens or out[-1] in eos_ids:
            break
        # 6. Keep the accepted path in both caches.
        idx = torch.tensor(rows)
        verifier.keep(start, idx)
        t = time.perf_counter()
        assert aux is not None
        drafter.advance(torch.tensor(new), aux[idx])
        res.draft_s += time.perf_counter() - t
    res.total_s = time.perf_counter() - t0
    return res
