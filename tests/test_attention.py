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



def test_bf16_inputs_on_the_cpu_are_attended_in_fp32_and_come_back_in_bf16():
    """On the CPU sdpa runs in fp32 for bf16 activations (its bf16 kernels are slower): the output
    and the gradients keep the caller's dtype and equal the fp32 computation rounded once."""
    torch.manual_seed(0)
    pos = _packed_positions([[1, 5, 17, 3, 38], [64]])
    q32, k32, v32 = (torch.randn(2, 4, 64, 16) for _ in range(3))
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in (q32, k32, v32))
    ours = document_attention(q, k, v, pos, 16 ** -0.5)
    assert ours.dtype == torch.bfloat16
    exact = document_attention(q.detach().float(), k.detach().float(), v.detach().float(), pos, 16 ** -0.5)
    torch.testing.assert_close(ours, exact.to(torch.bfloat16), rtol=0, atol=0)
    grads = torch.autograd.grad(ours.float().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)

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


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract on the CPU: (total, H, D) tokens, causal attention inside
    each [cu[i], cu[i+1]) segment, GQA by head groups."""
    assert cu_q.dtype == torch.int32 and causal and dropout_p == 0.0 and torch.equal(cu_q, cu_k)
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    for a, b in zip(bounds, bounds[1:]):
        seg = lambda x: x[a:b].transpose(0, 1)[None]  # noqa: E731  (1, H, L, D)
        o = F.scaled_dot_product_attention(seg(q), seg(k), seg(v), is_causal=True, scale=softmax_scale,
                                           enable_gqa=k.shape[1] != q.shape[1])
        out[a:b] = o[0].transpose(0, 1)
    return out


def _torch_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's contract on the CPU: a window of (-1, 0) is causal."""
    assert tuple(window_size) == (-1, 0) and enable_gqa == (k.shape[1] != q.shape[1])
    return _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)


@pytest.mark.parametrize("kernel", ["flash-attn", "torch varlen_attn"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_metadata_of_a_multi_row_batch_is_its_documents(kv_heads, kernel):
    """transformers' own flash path treats a (B > 1, T) batch as B plain causal rows and mixes the
    documents; sabiscale hands a varlen kernel (flash-attn's, or torch's own) the documents themselves."""
    from sabiscale.model.attention import VarlenKernel, VarlenPlan, varlen_document_attention, varlen_metadata

    rows = [[1, 5, 17, 3, 38], [64], [30, 30, 1, 1, 2], [7] * 9 + [1]]
    pos = _packed_positions(rows)
    cu, longest = varlen_metadata(pos)
    lengths = [n for row in rows for n in row]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert longest == 64
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 4, 64, 16), torch.randn(4, kv_heads, 64, 16), torch.randn(4, kv_heads, 64, 16)
    stand_in = _varlen_reference if kernel == "flash-attn" else _torch_varlen_reference
    ours = varlen_document_attention(VarlenPlan(VarlenKernel(kernel, stand_in), cu, longest), q, k, v, 16 ** -0.5)
    torch.testing.assert_close(ours, _dense(q, k, v, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,dtype,capability,expected", [
    ("cuda", torch.bfloat16, (8, 0), True), ("cuda", torch.float16, (9, 0), True),
    ("cuda", torch.float32, (8, 0), False),   # eval and scoring load fp32 models: sdpa
    ("cuda", torch.float16, (7, 5), False),   # T4: the flash kernels need sm80
    ("cpu", torch.bfloat16, None, False), ("cpu", torch.float32, None, False)])
def test_the_varlen_kernel_is_chosen_per_device_and_dtype(device, dtype, capability, expected):
    from sabiscale.model.attention import flash_applies, installed_varlen_kernel, varlen_kernel

    assert flash_applies(device, dtype, capability) is expected
    assert varlen_kernel(torch.device("cpu"), torch.bfloat16) is None  # the CPU buckets for sdpa
    try:
        import flash_attn  # noqa: F401
        want = "flash-attn"
    except ImportError:  # this torch (2.13) brings its own varlen kernel: no flash-attn wheel needed
        want = "torch varlen_attn"
    assert installed_varlen_kernel().name == want


def test_the_varlen_metadata_is_made_once_per_micro_batch_not_per_layer(demo_cfg, parts, monkeypatch):
    """With a varlen kernel (here a CPU stand-in with its contract) a 4-layer model computes the
    documents' cu_seqlens once per forward, and its hidden states equal sdpa's."""
    from sabiscale.model import attention
    from sabiscale.model.build import hidden_at

    tok, batch, _ = parts
    cfg = demo_cfg.model.model_copy(update={"num_layers": 4})
    lm = build_model(cfg, len(tok), demo_cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, 0)
    needed = torch.ones_like(batch.loss_mask)
    expected = hidden_at(lm, batch.input_ids, batch.position_ids, needed)
    made = []
    real_metadata = attention.varlen_metadata
    monkeypatch.setattr(attention, "varlen_metadata", lambda pos: made.append(1) or real_metadata(pos))
    monkeypatch.setattr(attention, "varlen_kernel",
                        lambda device, dtype: attention.VarlenKernel("torch varlen_attn", _torch_varlen_reference))
    ours = hidden_at(lm, batch.input_ids, batch.position_ids, needed)
    assert len(made) == 1
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_the_model_never_asks_transformers_for_flash_attention(demo_cfg):
    from sabiscale.model.build import attention_implementation

    assert attention_implementation() == NAME
