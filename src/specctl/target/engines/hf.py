"""The embedded engine: any local HF causal LM through transformers, CPU (fp32) or GPU (bf16).

Capture: right-padded batches under a token budget, one forward of the *base* model (no
lm_head: full-vocab logits are never needed) with `HiddenCapture` hooks; pads are sliced off
per sample. Generation: left-padded batches with a KV cache, one `torch.Generator` per row so
a sample's draws depend only on its own seed.

Finished rows (a stop token) leave the batch at once (`DynamicCache.batch_select_indices`),
so a batch costs what its live rows cost; sampling is one batched softmax per step, then per
row a top-k nucleus and one multinomial with that row's generator.

Precision: GPUs run bf16; on CPU `precision="auto"` times both dtypes on the model and keeps
the faster (bf16 is 2-3x faster with AMX, ~6x slower without AVX512-BF16; see
`specctl.precision`). Traps: left padding needs explicit position_ids (cumsum of the mask), or pads shift RoPE positions;
`logits_to_keep=1` avoids [B, L, vocab] logits at prefill.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specctl.precision import pick_dtype
from specctl.skinny import use_skinny_linears
from specctl.target.capture import HiddenCapture, decoder_parts
from specctl.target.engines import (
    Captured,
    SamplingParams,
    cache_kwarg,
    check_aux_layers,
    out_cache,
)
from specctl.target.models import load_model, load_tokenizer
from specctl.target.template import Tokenized


class HFEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        device: str | None = None,
        aux_layers: list[int] | None = None,
        token_budget: int = 8192,
        precision: str | None = None,  # None: fp32 on CPU (exact), bf16 on GPU; or auto|fp32|bf16
    ) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        precision = precision or ("fp32" if self.device == "cpu" else "bf16")
        self.tokenizer = load_tokenizer(model_path)
        self.model, self.precision = pick_dtype(
            lambda dtype: load_model(model_path, self.device, dtype), precision, self.device
        )
        if self.precision["dtype"] == "fp32":
            # generation steps of <= 8 live rows (small batches, a batch's tail after EOS)
            # take the skinny path (1.3-1.9x per step at 4-8 rows on the AMD EPYC; within 1%
            # at batch 8-16 on an AMX Xeon); captures and bigger batches keep F.linear
            use_skinny_linears(self.model)
        cfg = self.model.config
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = len(decoder_parts(self.model)[1])
        self.aux_layers = check_aux_layers(aux_layers, self.num_layers)
        self.token_budget = token_budget
        self.stop_ids = _stop_ids(self.model, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id)

    @torch.inference_mode()
    def capture(self, samples: list[Tokenized]) -> list[Captured]:
        out: list[Captured | None] = [None] * len(samples)
        for batch in token_batches([len(s.input_ids) for s in samples], self.token_budget):
            for i, got in zip(batch, self._capture_batch([samples[i] for i in batch]), strict=True):
                out[i] = got
        return [c for c in out if c is not None]

    def _capture_batch(self, samples: list[Tokenized]) -> list[Captured]:
        # 1. right-pad: [B, L] ids and attention mask
        ids, mask = pad_batch([s.input_ids for s in samples], self.pad_id, left=False)
        ids, mask = ids.to(self.device), mask.to(self.device)
        # 2. one forward of the decoder; hooks keep k aux [B, L, H] and last [B, L, H]
        with HiddenCapture(self.model, self.aux_layers) as cap:
            cap.base(input_ids=ids, attention_mask=mask, use_cache=False)
        assert cap.last is not None
        # 3. strip pads per sample (views; the packer copies them out)
        res = []
        for b, s in enumerate(samples):
            t = len(s.input_ids)
            res.append(
                Captured(s.input_ids, s.loss_mask, [a[b, :t] for a in cap.aux], cap.last[b, :t])
            )
        return res

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        budget = max(self.token_budget, 1)
        lens = [len(p) + params.max_new_tokens for p in prompts]
        for batch in token_batches(lens, budget):
            got = self._generate_batch(
                [prompts[i] for i in batch], params, [seeds[i] for i in batch]
            )
            for i, g in zip(batch, got, strict=True):
                out[i] = g
        return out

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[int]]:
        # 1. left-pad so every row's next token sits in the last column
        ids, mask = pad_batch(prompts, self.pad_id, left=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        new: list[list[int]] = [[] for _ in prompts]
        rows = list(range(len(prompts)))  # batch row b generates for prompt rows[b]
        cache = None
        step_ids = ids
        for _ in range(params.max_new_tokens):
            # 2. positions from the mask so left pads do not shift RoPE
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kwarg(self.model): cache},
            )
            cache = out_cache(out)
            # 3. one draw per row with the row's own generator: [B, V] -> B tokens
            nxt = sample_rows(out.logits[:, -1].float(), params, [gens[r] for r in rows])
            for r, tok in zip(rows, nxt, strict=True):
                new[r].append(tok)
            # 4. finished rows (EOS) leave the batch: no more compute spent on them
            live = [b for b, tok in enumerate(nxt) if tok not in self.stop_ids]
            if not live:
                break
            if len(live) < len(rows):
                keep = torch.tensor(live, device=self.device)
                cache.batch_select_indices(keep)
                mask, rows = mask[keep], [rows[b] for b in live]
                nxt = [nxt[b] for b in live]
            step_ids = torch.tensor([[t] for t in nxt], device=self.device)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return new

    def close(self) -> None:
        pass


def sample_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """logits [V] -> one token: greedy at temperature 0, else temperature + nucleus sampling."""
    return sample_rows(logits[None], params, [gen])[0]


def sample_rows(
    logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]
) -> list[int]:
    """logits [B, V] -> B tokens; row b draws only from gens[b], so rows never share draws.

    Nucleus sampling takes the top 256 of a row (growing 8x until they hold top_p of the
    mass) instead of sorting all V: a full sort of a 49k vocab per row per step cost about
    as much as the decode step itself here. Per row, so no row depends on its batch-mates.
    """
    if params.temperature <= 0:
        return [int(t) for t in logits.argmax(-1).tolist()]
    probs = torch.softmax(logits / params.temperature, dim=-1)  # [B, V]
    out = []
    for b, gen in enumerate(gens):
        p, order = probs[b], None
        if params.top_p < 1.0:
            k = min(256, p.numel())
            while True:
                top, order = p.topk(k)  # [k] each, descending
                if k == p.numel() or float(top.sum()) >= params.top_p:
                    break
                k = min(k * 8, p.numel())
            p = top * (top.cumsum(-1) - top < params.top_p)  # always keeps the top token
        j = int(torch.multinomial(p, 1, generator=gen))
        out.append(int(order[j]) if order is not None else j)
    return out


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, L] int64, attention mask [B, L] int64 (1 = real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[b, sl] = torch.tensor(s, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask


def token_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Group indices (longest first, to pad little) so B * max_len <= budget; singletons may exceed."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _stop_ids(model: torch.nn.Module, tokenizer: object) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return ids
