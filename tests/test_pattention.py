"""Pattention against the formulas of DESIGN.md section 1, in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_tokenformer import Pattention
from megatron_tokenformer.pattention import EPS, theta


def reference(x, K, V, norm, tau):
    """The formulas written out as plainly as possible, one row at a time."""
    rows = []
    for xr in x.reshape(-1, x.shape[-1]):
        s = K @ xr
        if norm == "l2_norm_gelu":
            a = F.gelu(tau * s / torch.sqrt((s * s).sum() + EPS))
        elif norm == "gelu_l2_norm":
            g = F.gelu(s)
            a = tau * g / torch.sqrt((g * g).sum() + EPS)
        else:
            e = torch.exp(s - s.max())
            a = tau * e / e.sum()
        rows.append(a @ V)
    return torch.stack(rows).reshape(*x.shape[:-1], V.shape[-1])


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_forward_matches_formula(norm):
    torch.manual_seed(0)
    layer = Pattention(12, 7, 10, norm=norm).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    expect_tau = 10.0 if norm == "softmax" else math.sqrt(10)
    assert layer.tau == pytest.approx(expect_tau)
    out = layer(x)
    ref = reference(x, layer.key_tokens, layer.value_tokens, norm, layer.tau)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_gradcheck(norm):
    torch.manual_seed(1)
    layer = Pattention(6, 4, 5, norm=norm).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, k, v: theta(x @ k.t(), norm, layer.tau) @ v,
                                    (x, layer.key_tokens, layer.value_tokens))


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_fused_groups_equal_separate_layers(norm):
    torch.manual_seed(2)
    fused = Pattention(8, 8, 6, norm=norm, groups=3).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    out = fused(x)
    assert out.shape == (3, 2, 4, 8)
    for g in range(3):
        single = Pattention(8, 8, 6, norm=norm).double()
        with torch.no_grad():
            single.key_tokens.copy_(fused.key_tokens[g])
            single.value_tokens.copy_(fused.value_tokens[g])
        torch.testing.assert_close(out[g], single(x), rtol=1e-12, atol=1e-12)


def test_zero_row_is_finite_and_softmax_does_not_overflow():
    layer = Pattention(4, 3, 5)
    out = layer(torch.zeros(2, 4))  # all-zero scores: the reference code gives NaN here
    assert torch.isfinite(out).all() and out.abs().max() == 0
    sm = Pattention(4, 3, 5, norm="softmax").half()
    with torch.no_grad():
        sm.key_tokens.fill_(100.0)  # scores of 4e4: exp overflows fp16 without the max subtraction
    assert torch.isfinite(sm(torch.ones(1, 4, dtype=torch.half)).float()).all()


def test_tau_is_stored_not_recomputed():
    layer = Pattention(4, 4, 16, tau=3.5)
    state = layer.state_dict()
    other = Pattention(4, 4, 16).bfloat16()  # casting the module must not round tau
    other.load_state_dict(state)
    assert other.tau == 3.5


def test_zero_keys_appended_preserve_output():
    """DESIGN.md section 2: new tokens with zero keys and tau kept leave the function unchanged."""
    torch.manual_seed(3)
    small = Pattention(8, 8, 6).double()
    big = Pattention(8, 8, 10, tau=small.tau).double()
    with torch.no_grad():
        big.key_tokens.copy_(torch.cat([small.key_tokens, torch.zeros(4, 8, dtype=torch.float64)]))
        big.value_tokens.copy_(torch.cat([small.value_tokens, torch.randn(4, 8, dtype=torch.float64)]))
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(big(x), small(x), rtol=1e-12, atol=1e-12)


def _outputs_and_grads(layers, x, loss):
    """Each layer's output and the gradients of `loss(output)` w.r.t. input, keys and values."""
    out = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        y = layer(xi)
        loss(y).backward()
        out.append((y, xi.grad, layer.key_tokens.grad, layer.value_tokens.grad))
    return out


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_fused_equals_reference(norm, groups):
    """The hand-written backward (keeps S only) against autograd through the formulas."""
    torch.manual_seed(4)
    ref = Pattention(10, 6, 8, norm=norm, groups=groups, impl="reference").double()
    fused = Pattention(10, 6, 8, norm=norm, groups=groups).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    outs = _outputs_and_grads((ref, fused), x,
                              lambda y: (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum())
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_fused_gradcheck(norm):
    from megatron_tokenformer.pattention import _FusedPattention

    torch.manual_seed(5)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    k = (0.5 * torch.randn(2, 5, 6, dtype=torch.float64)).requires_grad_()
    v = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, k, v: _FusedPattention.apply(x, k, v, norm, 2.0, EPS, None), (x, k, v))


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "softmax"])
def test_compiled_kernels_equal_fused(norm):
    """The torch.compile'd elementwise kernels (the GPU path) give the eager fused numbers."""
    torch.manual_seed(7)
    eager = Pattention(16, 8, 32, norm=norm, groups=3)
    comp = Pattention(16, 8, 32, norm=norm, groups=3, impl="compiled")
    comp.load_state_dict(eager.state_dict())
    res = _outputs_and_grads((eager, comp), torch.randn(4, 16), lambda y: y.square().sum())
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_fused_bf16_close_to_fp32(norm):
    """bf16 matmuls with fp32 statistics stay within bf16 rounding of the fp32 result."""
    torch.manual_seed(6)
    layer = Pattention(64, 64, 128, norm=norm)
    x = torch.randn(32, 64)
    want = layer(x)
    got = layer.bfloat16()(x.bfloat16()).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
