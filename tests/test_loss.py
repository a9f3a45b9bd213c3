"""The loss stage against the naive HF computation, on real packed batches from the demo shards."""
import dataclasses

import pytest
import torch

from sabiscale.loss.objective import TokenLossObjective, loss_kind
from sabiscale.model.build import build_model


def target_selection(loss_mask, input_ids, position_ids, kind: str, pad_id: int):
    """(B, T-1) bool: the targets a loss kind may count, by the kind's own rule."""
    return loss_kind(kind).candidates(input_ids, position_ids, loss_mask, pad_id)


def _model(demo_cfg, tok, seed=0):
    return build_model(demo_cfg.model, len(tok), demo_cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, seed)


def _hf_loss_and_grads(lm, batch, selected):
    labels = batch.input_ids.clone()
    labels[:, 1:][~selected] = -100
    labels[:, 0] = -100
    lm.zero_grad()
    out = lm(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}


@pytest.mark.parametrize("kind", ["masked", "clm"])
def test_loss_and_gradients_equal_full_logits_hf(demo_cfg, parts, kind):
    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok)
    # one sequence with no supervised token at all, which the loss must simply skip
    batch = dataclasses.replace(batch, loss_mask=batch.loss_mask.clone())
    batch.loss_mask[1] = False
    selected = target_selection(batch.loss_mask, batch.input_ids, batch.position_ids, kind, tok.pad_token_id)
    ref_loss, ref_grads = _hf_loss_and_grads(lm, batch, selected)

    objective = TokenLossObjective(lm, kind, chunk_size=37, pad_id=tok.pad_token_id)
    lm.zero_grad()
    out = objective(batch.input_ids, batch.position_ids, batch.loss_mask)
    loss_sum, count = out.loss_sum, out.count
    (loss_sum / count).backward()
    assert int(objective.count_targets(batch.input_ids, batch.position_ids, batch.loss_mask)) == int(count)
    assert int(count) == int(selected.sum()) > 0
    torch.testing.assert_close(loss_sum / count, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_masked_targets_are_answers_and_clm_skips_padding_and_doc_starts(parts):
    tok, batch, vocab = parts
    masked = target_selection(batch.loss_mask, batch.input_ids, batch.position_ids, "masked", tok.pad_token_id)
    clm = target_selection(batch.loss_mask, batch.input_ids, batch.position_ids, "clm", tok.pad_token_id)
    assert (masked & ~clm).sum() == 0 and clm.sum() > masked.sum()
    assert not clm[batch.input_ids[:, 1:] == tok.pad_token_id].any()
    assert not clm[batch.position_ids[:, 1:] == 0].any()


def test_packed_documents_do_not_attend_to_each_other(demo_cfg, parts):
    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok).eval()
    seq, pos = batch.input_ids[0], batch.position_ids[0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3, "need a sequence with at least two packed documents"
    start, end = starts[1], starts[2]  # the second document, preceded by the first
    alone = seq[start:end][None]
    with torch.no_grad():
        packed_logits = lm(input_ids=seq[None], position_ids=pos[None]).logits[0, start:end]
        alone_logits = lm(input_ids=alone, position_ids=torch.arange(end - start)[None]).logits[0]
        # the contamination this guards against: the same call without position_ids sees the first document
        leaky_logits = lm(input_ids=seq[None]).logits[0, start:end]
    torch.testing.assert_close(packed_logits, alone_logits, rtol=1e-4, atol=1e-4)
    assert (leaky_logits - alone_logits).abs().max() > 1e-3

    # the same through the objective: the document's loss is the same packed or alone
    objective = TokenLossObjective(lm, "masked", 64, tok.pad_token_id)
    only_doc = torch.zeros_like(batch.loss_mask[0])
    only_doc[start:end] = batch.loss_mask[0, start:end]
    with torch.no_grad():
        packed = objective(seq[None], pos[None], only_doc[None])
        single = objective(alone, torch.arange(end - start)[None], only_doc[start:end][None])
    assert int(packed.count) == int(single.count) > 0
    torch.testing.assert_close(packed.per_token, single.per_token, rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_the_loss(demo_cfg, parts):
    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok)
    results = []
    for chunk in (1, 50, 100000):
        with torch.no_grad():
            results.append(TokenLossObjective(lm, "masked", chunk, tok.pad_token_id)(
                batch.input_ids, batch.position_ids, batch.loss_mask).loss_sum)
    torch.testing.assert_close(results[0], results[2], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(results[1], results[2], rtol=1e-5, atol=1e-3)


def test_cpu_logits_workspace_is_reused_and_never_leaks_between_batches(demo_cfg, parts):
    """The fp32 CPU head writes every chunk's logits into one kept block: a second, smaller batch
    must still give the HF result (no rows of the first batch read back), and the block stays out
    of the state dict that checkpoints and export save."""
    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok)
    objective = TokenLossObjective(lm, "masked", chunk_size=4096, pad_id=tok.pad_token_id)
    keys = set(lm.state_dict())
    objective(batch.input_ids, batch.position_ids, batch.loss_mask)
    block = lm.lm_head._workspace
    assert block is not None and block.shape[1] == lm.config.vocab_size
    smaller = dataclasses.replace(batch, loss_mask=batch.loss_mask.clone())
    smaller.loss_mask[: len(batch.loss_mask) // 2] = False
    selected = target_selection(smaller.loss_mask, smaller.input_ids, smaller.position_ids, "masked", tok.pad_token_id)
    ref_loss, ref_grads = _hf_loss_and_grads(lm, smaller, selected)
    lm.zero_grad()
    out = objective(smaller.input_ids, smaller.position_ids, smaller.loss_mask)
    (out.loss_sum / out.count).backward()
    assert lm.lm_head._workspace.data_ptr() == block.data_ptr()  # kept, not allocated again
    torch.testing.assert_close(out.loss_sum / out.count, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm.lm_head.weight.grad, ref_grads["lm_head.weight"], rtol=1e-4, atol=1e-6)
    assert set(lm.state_dict()) == keys


def test_task_weights_scale_and_drop_tasks(demo_cfg, parts):
    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok)
    plain = TokenLossObjective(lm, "masked", 64, tok.pad_token_id)
    ner = vocab.tasks.index("ner")
    weights = [0.0 if i == ner else (2.0 if name == "translation" else 1.0) for i, name in enumerate(vocab.tasks)]
    weighted = TokenLossObjective(lm, "masked", 64, tok.pad_token_id, weights)
    with torch.no_grad():
        a = plain(batch.input_ids, batch.position_ids, batch.loss_mask, batch.task_ids)
        b = weighted(batch.input_ids, batch.position_ids, batch.loss_mask, batch.task_ids)
    target_task = batch.task_ids[:, 1:][a.selected]
    keep = target_task != ner
    assert int(b.count) == int(keep.sum()) < int(a.count)  # NER tokens never reach the head
    factor = torch.where(target_task == vocab.tasks.index("translation"), 2.0, 1.0)
    expected = (a.per_token * factor)[keep].sum()
    torch.testing.assert_close(b.loss_sum, expected, rtol=1e-5, atol=1e-4)


def test_flop_accounting_matches_pytorchs_count_of_the_executed_matmuls(demo_cfg, parts):
    """MFU's numerator: StepCost's executed FLOPs minus attention (which the CPU sdpa kernel's
    FLOP counter does not see) equal every matmul PyTorch counts in a forward + backward; the
    needed FLOPs differ from them only by padding and attention."""
    from torch.utils.flop_counter import FlopCounterMode

    from sabiscale.model.attention import bucket_plan
    from sabiscale.track.flops import batch_flops, step_cost

    from sabiscale.data.loader import make_loader
    from sabiscale.shards.format import read_manifest, split_shards

    tok, _, vocab = parts
    shards = split_shards(demo_cfg.shards_dir, read_manifest(demo_cfg.shards_dir), "train")
    # the first micro-batch with padding in it: padding is what needed and executed FLOPs differ by
    batch = next(b for b in make_loader(shards, vocab, 4, 0, 1, 0, shuffle=False)
                 if int((b.task_ids < 0).sum()) > 0)
    lm = _model(demo_cfg, tok)
    objective = TokenLossObjective(lm, "masked", chunk_size=64, pad_id=tok.pad_token_id)
    with FlopCounterMode(display=False) as counter:
        out = objective(batch.input_ids, batch.position_ids, batch.loss_mask)
        out.loss_sum.backward()
    cost = step_cost(lm)
    real = batch.task_ids >= 0
    needed, executed = batch_flops(cost, batch.position_ids, real, int(out.count))
    pairs = sum(n * longest * (longest + 1) / 2 for n, longest in bucket_plan(batch.position_ids).shapes)
    # the counter does not register in-place addmm_, which the head uses for its weight gradient
    head_weight_grad = 2 * lm.config.vocab_size * lm.config.hidden_size * int(out.count)
    assert counter.get_total_flops() + head_weight_grad == pytest.approx(executed - cost.attention * pairs, rel=1e-9)
    documents = []  # [length, is real] read off position_ids row by row
    for row, row_real in zip(batch.position_ids.tolist(), real.tolist()):
        for position, is_real in zip(row, row_real):
            if position == 0:
                documents.append([0, is_real])
            documents[-1][0] += 1
    doc_pairs = sum(n * (n + 1) / 2 for n, is_real in documents if is_real)
    padding = batch.input_ids.numel() - int(real.sum())
    assert padding > 0 and pairs > doc_pairs
    assert needed == pytest.approx(executed - (cost.body - cost.tail) * padding - cost.attention * (pairs - doc_pairs),
                                   rel=1e-9)


@pytest.mark.parametrize("weight,equals", [(0.0, "masked"), (1.0, "clm")])
def test_prompt_weight_spans_the_masked_and_the_all_token_loss(demo_cfg, parts, weight, equals):
    """loss.prompt_weight 0 is SabiYarn's masked loss and 1 the all-token loss, to float error;
    in between, prompt tokens count with that weight and the head runs on them."""
    from sabiscale.config import LossConfig
    from sabiscale.loss.kinds import make_loss_kind

    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok)
    weighted = TokenLossObjective(lm, make_loss_kind(LossConfig(kind="masked", prompt_weight=weight)), 64,
                                  tok.pad_token_id)
    reference = TokenLossObjective(lm, equals, 64, tok.pad_token_id)
    with torch.no_grad():
        a = weighted(batch.input_ids, batch.position_ids, batch.loss_mask)
        b = reference(batch.input_ids, batch.position_ids, batch.loss_mask)
    assert int(a.count) == int(b.count) and torch.equal(a.selected, b.selected)
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-6, atol=1e-5)


def test_a_prompt_weight_between_counts_prompt_tokens_with_that_weight(demo_cfg, parts):
    from sabiscale.config import LossConfig
    from sabiscale.loss.kinds import make_loss_kind

    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok)
    third = TokenLossObjective(lm, make_loss_kind(LossConfig(kind="masked", prompt_weight=0.3)), 64, tok.pad_token_id)
    every = TokenLossObjective(lm, "clm", 64, tok.pad_token_id)
    with torch.no_grad():
        a = third(batch.input_ids, batch.position_ids, batch.loss_mask)
        b = every(batch.input_ids, batch.position_ids, batch.loss_mask)
    answer = batch.loss_mask[:, 1:][b.selected]
    expected = (b.per_token * torch.where(answer, 1.0, 0.3)).sum()
    assert int(a.count) == int(b.count) > int(answer.sum())  # the head ran on the prompt tokens too
    torch.testing.assert_close(a.loss_sum, expected, rtol=1e-5, atol=1e-4)
    assert third.count_targets(batch.input_ids, batch.position_ids, batch.loss_mask) == int(a.count)
    with pytest.raises(Exception, match="prompt_weight applies to loss.kind=masked"):
        LossConfig(kind="clm", prompt_weight=0.5)


def test_the_eval_set_is_one_global_set_split_evenly_over_ranks(demo_cfg, parts):
    """Each rank runs as many eval forwards as the others (ZeRO-3 gathers parameters inside every
    forward); the filler of a smaller share counts nothing, so the reduced loss is the 1-rank one."""
    from sabiscale.train.loop import evaluate
    from sabiscale.train.run import eval_share

    _, batch, vocab = parts
    batches = [dataclasses.replace(batch, index=i) for i in range(3)]
    shares = [eval_share(batches, rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 2] and [b.index for b in shares[0]] == [0, 2]
    filler = shares[1][1]
    assert not filler.loss_mask.any()
    tok = parts[0]
    objective = TokenLossObjective(_model(demo_cfg, tok), "masked", 64, tok.pad_token_id)
    alone = evaluate(objective, [batches[1]], vocab, torch.device("cpu"))
    with_filler = evaluate(objective, shares[1], vocab, torch.device("cpu"))
    assert with_filler == pytest.approx(alone)  # the filler adds no token, to any task or language
