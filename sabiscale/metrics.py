"""Per-task and per-language token accounting for logging (sums and counts, reduced across ranks)."""
from __future__ import annotations

import torch

from .data.batch import Batch, Vocab
from .loss.masked import TokenLosses


class TokenStats:
    """Sums of unweighted token losses and token counts per task and per language."""

    def __init__(self, vocab: Vocab, device: torch.device) -> None:
        self.vocab = vocab
        self.task = torch.zeros(2, len(vocab.tasks), dtype=torch.float64, device=device)  # [sum, count]
        self.lang = torch.zeros(2, len(vocab.langs), dtype=torch.float64, device=device)

    def add(self, batch: Batch, out: TokenLosses) -> None:
        losses = out.per_token.to(torch.float64)
        for table, ids in ((self.task, batch.task_ids), (self.lang, batch.lang_ids)):
            idx = ids[:, 1:][out.selected]
            keep = idx >= 0
            table[0].index_add_(0, idx[keep], losses[keep])
            table[1].index_add_(0, idx[keep], torch.ones_like(losses[keep]))

    def metrics(self, prefix: str, all_reduce) -> dict[str, float]:
        """Reduced over ranks: `{prefix}/loss/task/<t>`, `{prefix}/supervised_tokens/task/<t>`, same for lang."""
        out: dict[str, float] = {}
        for kind, table, names in (("task", self.task, self.vocab.tasks), ("lang", self.lang, self.vocab.langs)):
            total = all_reduce(table.clone())
            for i, name in enumerate(names):
                if total[1, i] > 0:
                    out[f"{prefix}/loss/{kind}/{name}"] = float(total[0, i] / total[1, i])
                    out[f"{prefix}/supervised_tokens/{kind}/{name}"] = float(total[1, i])
        return out

    def reset(self) -> None:
        self.task.zero_()
        self.lang.zero_()
