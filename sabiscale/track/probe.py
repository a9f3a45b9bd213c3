"""Per-token losses of a fixed probe set during training, for token-level loss trajectories.

The probe is the first `train.probe_batches` micro-batches of the validation shards, read the same
way on every rank (so ZeRO-3's collective forward works and every rank agrees). Every
`train.probe_every` steps (and before the first and after the last step) the answer-token losses
of the probe are written by rank 0 as
    <output_dir>/probe/meta.npz                token id, task, language, position in the answer,
                                               (batch, row, column) of every probe token, the probe's
                                               input_ids (for context) and the task/language names
    <output_dir>/probe/loss_<step:08d>.npy     float16 (N,): each probe token's loss at that step
and logged to the MLflow run under probe/. `sabiscale analyze` (analysis/) reads them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sabiscale.data.batch import Batch, Vocab
from sabiscale.shards.format import load_npy, save_npy, save_npz
from sabiscale.errors import UserError


def answer_positions(loss_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """(B, T) int: for a supervised token, how many supervised tokens precede it in its document
    (0 = the first answer token); -1 elsewhere."""
    out = np.full(loss_mask.shape, -1, dtype=np.int32)
    for row in range(loss_mask.shape[0]):
        count = 0
        for col in range(loss_mask.shape[1]):
            if position_ids[row, col] == 0:
                count = 0
            if loss_mask[row, col]:
                out[row, col] = count
                count += 1
    return out


def probe_metadata(batches: list[Batch], vocab: Vocab) -> dict[str, np.ndarray]:
    """One entry per probe token (a supervised next-token target), in the order the objective
    returns its per-token losses."""
    fields: dict[str, list] = {k: [] for k in ("token_id", "task", "lang", "answer_position", "batch", "row", "col")}
    for index, b in enumerate(batches):
        targets = b.loss_mask[:, 1:].numpy()
        rows, cols = np.nonzero(targets)
        cols_in_seq = cols + 1
        positions = answer_positions(b.loss_mask.numpy(), b.position_ids.numpy())
        fields["token_id"].append(b.input_ids.numpy()[rows, cols_in_seq])
        fields["task"].append(b.task_ids.numpy()[rows, cols_in_seq])
        fields["lang"].append(b.lang_ids.numpy()[rows, cols_in_seq])
        fields["answer_position"].append(positions[rows, cols_in_seq])
        fields["batch"].append(np.full(len(rows), index))
        fields["row"].append(rows)
        fields["col"].append(cols_in_seq)
    meta = {k: np.concatenate(v).astype(np.int32) for k, v in fields.items()}
    meta["input_ids"] = np.stack([b.input_ids.numpy() for b in batches]).astype(np.int32)
    meta["task_names"] = np.array(vocab.tasks)
    meta["lang_names"] = np.array(vocab.langs)
    return meta


@torch.no_grad()
def probe_losses(objective: torch.nn.Module, batches: list[Batch], device: torch.device) -> np.ndarray:
    was_training = objective.training
    objective.eval()
    losses = []
    for b in batches:
        b = b.to(device)
        out = objective(b.input_ids, b.position_ids, b.loss_mask, kind="masked")
        losses.append(out.per_token.float().cpu())
    objective.train(was_training)
    return torch.cat(losses).numpy().astype(np.float16)


class ProbeRecorder:
    def __init__(self, batches: list[Batch], vocab: Vocab, out_dir: Path, rank: int, tracker) -> None:
        self.batches, self.out_dir, self.rank, self.tracker = batches, Path(out_dir), rank, tracker
        if rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            meta_path = self.out_dir / "meta.npz"
            meta = probe_metadata(batches, vocab)
            if meta_path.is_file():  # a resumed run must probe the very same tokens
                before = load_npy(meta_path)
                if not np.array_equal(before["token_id"], meta["token_id"]):
                    raise UserError(f"{meta_path} describes another probe set than this run's validation shards; "
                                     "move the probe/ directory aside or set train.probe_every=0")
            else:
                save_npz(meta_path, **meta)
                tracker.log_artifact(meta_path, "probe")

    def record(self, step: int, objective: torch.nn.Module, device: torch.device) -> None:
        losses = probe_losses(objective, self.batches, device)  # every rank: ZeRO-3 forwards are collective
        if self.rank == 0:
            path = self.out_dir / f"loss_{step:08d}.npy"
            save_npy(path, losses)
            self.tracker.log_artifact(path, "probe")
