"""Recording: pooling rules, tuple outputs, execution order (not registration order)."""

import pytest
import torch
from torch import nn

from act_core.errors import ACTInputError
from act_core.recording import ActivationRecorder, pool, select_modules, token_mask, token_mask_hooks


class OutOfOrder(nn.Module):
    """Registers `late` before `early` but runs `early` first (like a UNet's mid_block)."""

    def __init__(self):
        super().__init__()
        self.late = nn.LayerNorm(4)
        self.early = nn.LayerNorm(4)
        self.attention = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        x = self.early(x)
        x, _ = self.attention(x, x, x)
        return self.late(x)


def test_execution_order_differs_from_registration_order():
    model = OutOfOrder()
    modules = select_modules(model, ["*"], types=(nn.LayerNorm, nn.MultiheadAttention))
    assert list(modules) == ["late", "early", "attention"]
    with torch.no_grad(), ActivationRecorder(modules) as recorder:
        model(torch.randn(2, 3, 4))
    assert recorder.recorded() == ["early", "attention", "late"]
    assert recorder.samples("attention").shape == (2, 4)  # tuple output: first element pooled


def test_pooling_uses_the_token_mask_and_spatial_mean():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with token_mask(mask):
        pooled = pool(x)
    torch.testing.assert_close(pooled, torch.stack([x[0, :2].mean(0), x[1, :1].mean(0)]))
    torch.testing.assert_close(pool(x), x.mean(1))  # no mask outside the context
    image = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(pool(image), image.mean(dim=(2, 3)))
    assert pool(torch.randn(3, 7)).shape == (3, 7)


def test_mask_of_another_shape_is_ignored():
    with token_mask(torch.ones(2, 5)):
        x = torch.randn(2, 3, 4)
        torch.testing.assert_close(pool(x), x.mean(1))


class MaskedEncoder(nn.Module):
    """A stand-in text encoder: a LayerNorm over embedded ids; id 0 is padding. Raises on negative ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, ids):
        if (ids < 0).any():
            raise ValueError("negative id")
        return self.norm(self.embed(ids))


def test_token_mask_hooks_pool_real_tokens_and_leave_no_stale_mask_after_a_failed_forward():
    encoder = MaskedEncoder()
    handles = token_mask_hooks(encoder, lambda args, kwargs: args[0] != 0)
    ids = torch.tensor([[3, 4, 0], [5, 0, 0]])
    with torch.no_grad(), ActivationRecorder({"norm": encoder.norm}) as recorder:
        out = encoder(ids)
    torch.testing.assert_close(
        recorder.samples("norm"), torch.stack([out[0, :2].mean(0), out[1, :1].mean(0)])
    )

    with pytest.raises(ValueError, match="negative id"):
        encoder(torch.tensor([[-1, 1, 0], [1, 0, 0]]))
    x = torch.randn(2, 3, 4)  # same (B, T) as the failed call's mask: a stale mask would change the pooling
    torch.testing.assert_close(pool(x), x.mean(1))

    for handle in handles:
        handle.remove()
    with torch.no_grad(), ActivationRecorder({"norm": encoder.norm}) as recorder:
        out = encoder(ids)
    torch.testing.assert_close(recorder.samples("norm"), out.mean(1))  # hooks removed: all tokens


def test_select_modules_by_pattern_type_prefix_and_exclude():
    model = OutOfOrder()
    assert list(select_modules(model, ["*ly"], prefix="unet.")) == ["unet.early"]
    assert list(select_modules(model, types=(nn.LayerNorm,), exclude=["late"])) == ["early"]


def test_empty_selection_and_unrun_module_errors():
    with pytest.raises(ACTInputError, match="matched nothing"):
        ActivationRecorder({})
    recorder = ActivationRecorder({"x": nn.LayerNorm(2)})
    with pytest.raises(ACTInputError, match="never ran"):
        recorder.samples("x")
