"""Per-document attention for packed batches: exactly the block-diagonal masked sdpa, cheaper."""
import pytest
import torch
import torch.nn.functional as F

from sabiscale.model.attention import NAME, document_attention, length_buckets
from sabiscale.model.build import build_model


def _packed_positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[p for n in row for p in range(n)] for row in lengths_per_row])


def _dense(q, k, v, position_ids):
    """The reference: sdpa with the block-diagonal causal mask transformers builds."""
    doc = torch.cumsum((position_ids == 0).long(), 1)
    t = position_ids.shape[1]
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_outputs_and_gradients_equal_the_masked_dense_attention(kv_heads):
    torch.manual_seed(0)
    # documents of every kind: length 1, many short ones, one filling the row, a tail of padding
    rows = [[1, 5, 17, 3, 38], [64], [30, 30, 1, 1, 2], [7] * 9 + [1]]
    pos = _packed_positions(rows)
    q = torch.randn(4, 4, 64, 16, requires_grad=True)
    k = torch.randn(4, kv_heads, 64, 16, requires_grad=True)
    v = torch.randn(4, kv_heads, 64, 16, requires_grad=True)
    ours, ref = document_attention(q, k, v, pos, 16 ** -0.5), _dense(q, k, v, pos)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_buckets_hold_every_document_once_longest_first():
    lengths = [5, 300, 17, 1, 64, 64, 2, 120, 9, 9, 9, 9]
    groups = length_buckets(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [lengths[g[0]] for g in groups] == sorted((lengths[g[0]] for g in groups), reverse=True)
    assert len(groups) > 1  # a 300-token document is not padded together with 1-token ones


def test_the_model_gives_the_same_hidden_states_and_gradients_as_sdpa(demo_cfg, parts):
    tok, batch, _ = parts
    ours = build_model(demo_cfg.model, len(tok), demo_cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, 0)
    assert ours.config._attn_implementation == NAME
    ref = build_model(demo_cfg.model, len(tok), demo_cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, 0)
    ref.set_attn_implementation("sdpa")
    assert (batch.position_ids == 0).sum() > batch.input_ids.shape[0] * 2  # really packed
    h_ours = ours.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                        packed_documents=True).last_hidden_state
    h_ref = ref.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(h_ours, h_ref, rtol=1e-4, atol=1e-4)
    h_ours.square().mean().backward()
    h_ref.square().mean().backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=name)
    # without the flag (generation, padded batches) it is plain sdpa with transformers' mask
    plain = ours.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(plain, h_ref.detach(), rtol=1e-4, atol=1e-4)
