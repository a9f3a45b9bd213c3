"""Rho-1's reference model: a frozen sabiscale checkpoint that gives the loss of every answer
token. Used by training (`loss.reference: online`) and by `sabiscale score` (losses written into
shards once)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sabiscale.data.batch import Batch
from sabiscale.errors import UserError
from sabiscale.loss.objective import TokenLossObjective
from sabiscale.model.build import for_inference
from sabiscale.train.checkpoint import load_trained_lm, resolve_checkpoint


class Reference:
    """A frozen sabiscale checkpoint that gives the per-token loss of a batch's answer tokens."""

    def __init__(self, checkpoint: Path, device: torch.device, chunk_size: int = 2048) -> None:
        lm, tok, meta = load_trained_lm(checkpoint)
        self.tag_dir = resolve_checkpoint(checkpoint)
        self.meta = meta
        self.objective = for_inference(TokenLossObjective(lm, "masked", chunk_size, tok.pad_token_id), device)
        for p in self.objective.parameters():
            p.requires_grad_(False)

    def identity(self) -> dict:
        """What the scored manifest records: the checkpoint's files are hashed at save, so a hash
        of that inventory names its content without reading the weights again."""
        files = json.dumps(self.meta.get("files", {}), sort_keys=True).encode()
        return {"checkpoint": str(self.tag_dir), "step": self.meta["step"],
                "checkpoint_sha256": hashlib.sha256(files).hexdigest(),
                "tokenizer_sha256": self.meta["tokenizer_sha256"]}

    def check_tokenizer(self, manifest: dict, where: Path) -> None:
        if self.meta["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
            raise UserError(f"reference {self.tag_dir} was trained with tokenizer {self.meta['tokenizer_sha256'][:12]} "
                             f"but {where} uses {manifest['tokenizer_sha256'][:12]}: its losses would be of other "
                             "tokens; train the reference on shards made with the same tokenizer (tokenizer.path=...)")

    @torch.no_grad()
    def score(self, batch: Batch) -> torch.Tensor:
        """(B, T) float32: the loss of token t given its prefix, at answer tokens; NaN elsewhere."""
        out = self.objective(batch.input_ids, batch.position_ids, batch.loss_mask, kind="masked")
        ref = torch.full(batch.input_ids.shape, float("nan"), device=batch.input_ids.device)
        ref[:, 1:][out.selected] = out.per_token
        return ref
