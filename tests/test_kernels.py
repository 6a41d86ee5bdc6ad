"""models/accel/kernels.py: each speed kernel computes what the formula it replaces computes (the hand-written layer-norm
backward == autograd of the formula, the CPU dropout mask == dropout's distribution, one fused projection == the
separate linears, the CPU attention-dropout path == torch's attention). Tiny sizes, CPU."""
import torch
import torch.nn.functional as F
from torch import nn

from models.accel import kernels
from models.transformer import MultiHeadedAttention


def formula(x, a, b, eps=1e-6):
    std, mean = torch.std_mean(x, dim=-1, keepdim=True)
    return a * (x - mean) / (std + eps) + b


# ---- layer norm -----------------------------------------------------------------------------------------------
def test_layer_norm_backward_is_the_formulas_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, dtype=torch.double, requires_grad=True)
    a = torch.randn(9, dtype=torch.double, requires_grad=True)
    b = torch.randn(9, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: kernels._LayerNormFunction.apply(x, a, b, 1e-6), (x, a, b))
    # constant rows (std = 0): the formula's autograd gives finite gradients (torch masks std's 0/0), so do we
    z = torch.cat([torch.zeros(2, 9, dtype=torch.double), torch.randn(1, 9, dtype=torch.double)]).requires_grad_()
    g = torch.randn(3, 9, dtype=torch.double)
    want = torch.autograd.grad(formula(z, a, b), (z, a, b), g)
    got = torch.autograd.grad(kernels.layer_norm(z, a, b, 1e-6), (z, a, b), g)
    for w, h in zip(want, got):
        torch.testing.assert_close(h, w)
    with torch.no_grad():  # the no-grad form
        torch.testing.assert_close(kernels.layer_norm(z, a, b, 1e-6), formula(z, a, b))


def test_layer_norm_no_grad_forms_few_and_many_rows():
    """Both no-grad forms (std_mean for a few rows, centre + vector norm for more) are the formula."""
    torch.manual_seed(0)
    a, b = torch.rand(16), torch.rand(16)
    for rows in (1, 8, 9, 40):
        x = torch.randn(rows, 16)
        with torch.no_grad():
            torch.testing.assert_close(kernels.layer_norm(x, a, b, 1e-6), formula(x, a, b))


# ---- dropout --------------------------------------------------------------------------------------------------
def test_fast_dropout_has_the_distribution_and_gradient_of_dropout():
    torch.manual_seed(0)
    x = torch.randn(400, 500, requires_grad=True)
    y = kernels.dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 200,000 draws: 0.003 is > 4 standard deviations
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, kept.float() / 0.9)
    layer = kernels.Dropout(0.5)
    assert torch.equal(layer.eval()(x), x) and not torch.equal(layer.train()(x), x)
    assert torch.equal(kernels.dropout(x, 0.0), x) and not kernels.dropout(x, 1.0).any()


# ---- linear, fused projections ---------------------------------------------------------------------------------
def test_linear_is_the_module_call():
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 5), torch.randn(3, 8)
    assert torch.equal(kernels.linear(layer, x), layer(x))


def test_fused_projection_equals_the_separate_linears_and_follows_weight_changes():
    torch.manual_seed(0)
    attn = MultiHeadedAttention(2, 8, dropout=0.0).eval()
    x = torch.randn(3, 4, 8)
    for which in ((0, 1, 2), (1, 2)):
        want = torch.cat([attn.linears[i](x) for i in which], -1)
        with torch.no_grad():
            torch.testing.assert_close(kernels.project_concat(attn, x, which), want)
        torch.testing.assert_close(kernels.project_concat(attn, x, which), want)  # with gradients: anew each call
    with torch.no_grad():
        kernels.project_concat(attn, x, (1, 2))  # cached ...
        attn.linears[2].weight.mul_(2)  # ... then changed in place: the cache is rebuilt
        torch.testing.assert_close(kernels.project_concat(attn, x, (1, 2)),
                                   torch.cat([attn.linears[1](x), attn.linears[2](x)], -1))
    attn.double()  # .to() / .double(): rebuilt from the converted parameters
    with torch.no_grad():
        assert kernels.project_concat(attn, x.double(), (1, 2)).dtype == torch.double


# ---- attention ------------------------------------------------------------------------------------------------
def test_cpu_attention_dropout_path_is_torchs_attention(monkeypatch):
    """With attention dropout on the CPU the four plain steps run: with the dropout itself set aside they are
    torch's attention, and masked keys get no weight."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])[:, None, None, :]  # (B, 1, 1, Tk)
    monkeypatch.setattr(kernels, 'dropout', lambda x, p, training=True: x)
    got = kernels.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.5)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(got[0], F.scaled_dot_product_attention(q[0], k[0, :, :3], v[0, :, :3]))


def test_decoding_step_attention_uses_the_plain_steps_from_a_few_rows_on(monkeypatch):
    """A decoding step's attention (few queries per row, no gradients) from PLAIN_ATTENTION_MIN_ROWS rows on is the
    plain matmul/softmax/matmul (torch's fused CPU kernel is slower there), with torch's numbers to rounding and no
    weight on masked keys; one row, long queries and gradients keep torch's fused kernel."""
    torch.manual_seed(0)
    rows = kernels.PLAIN_ATTENTION_MIN_ROWS
    q, k, v = torch.randn(rows, 2, 2, 4), torch.randn(rows, 2, 5, 4), torch.randn(rows, 2, 5, 4)
    mask = (torch.arange(5) < torch.tensor([2, 5, 3, 1][:rows] + [5] * max(rows - 4, 0))[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fused = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **kw: fused.append(1) or real(*a, **kw))
    with torch.no_grad():
        got = kernels.scaled_dot_product_attention(q, k, v, mask)
        assert not fused
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        # the first image sees its 2 real keys only
        torch.testing.assert_close(got[0], real(q[0], k[0, :, :2], v[0, :, :2]), rtol=1e-6, atol=1e-6)
        kernels.scaled_dot_product_attention(q[:1], k[:1], v[:1])  # batch 1: fused
        kernels.scaled_dot_product_attention(torch.randn(rows, 2, 9, 4), k, v)  # many queries: fused
    assert len(fused) == 2
    q.requires_grad_(True)
    kernels.scaled_dot_product_attention(q, k, v, mask)  # with gradients: fused (training)
    assert len(fused) == 3
