"""DiffSeg maths and attention capture: KL merging on hand-built maps, aggregation, capture == SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from dinodiff.evaluate.attention import SelfAttentionCapture, capture_self_attention
from dinodiff.evaluate.diffseg import (
    _merge_once, aggregate_attention, anchor_grid, diffseg, label_map, layer_weights, merge_attention,
    resolve_threshold, symmetric_kl,
)


def _region_attention(regions: torch.Tensor, focus: float = 0.9, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(N, N) attention where every query attends mostly to its own region (regions: (S, S) int ids)."""
    flat = regions.reshape(-1)
    same = (flat[:, None] == flat[None, :]).double()
    attn = focus * same / same.sum(1, keepdim=True) + (1 - focus) / flat.numel()
    if noise:
        gen = torch.Generator().manual_seed(seed)
        attn = attn * (1 + noise * torch.rand(attn.shape, generator=gen, dtype=torch.float64))
    return (attn / attn.sum(1, keepdim=True)).float()


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the two label maps are the same partition up to renaming labels."""
    pairs = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)]), dim=1)
    return pairs.shape[1] == len(a.unique()) == len(b.unique())


def _three_regions(size: int = 8) -> torch.Tensor:
    regions = torch.zeros(size, size, dtype=torch.long)
    regions[:, size // 2:] = 1  # right half
    regions[size // 2:, : size // 4] = 2  # a bottom-left block
    return regions


def test_symmetric_kl_matches_the_definition_in_every_chunking():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(7, 20, generator=gen).softmax(-1)
    q = torch.rand(5, 20, generator=gen).softmax(-1)
    direct = 0.5 * (p[:, None] * (p[:, None] / q[None]).log()).sum(-1) + \
        0.5 * (q[None] * (q[None] / p[:, None]).log()).sum(-1)
    for chunk in (1, 3, 256):
        assert torch.allclose(symmetric_kl(p, q, chunk=chunk), direct, atol=1e-6)
    assert torch.allclose(symmetric_kl(p, p).diagonal(), torch.zeros(7), atol=1e-6)


def test_merge_recovers_known_regions_with_absolute_and_relative_thresholds():
    regions = _three_regions()
    attn = _region_attention(regions, noise=0.05)
    labels, _ = diffseg(attn, 4, [0.5] * 3, (8, 8), mode="absolute")
    assert _same_partition(labels, regions)
    labels, used = diffseg(attn, 4, [0.3] * 3, (8, 8), mode="relative")
    assert _same_partition(labels, regions)
    assert 0 < used[0] < 0.5  # a quantile of this image's anchor KLs: between within- and across-region values


def test_merge_keeps_every_anchor_at_threshold_zero_and_merges_all_at_a_huge_one():
    attn = _region_attention(_three_regions(), noise=0.2)
    grid = anchor_grid(8, 4)
    merged, _ = merge_attention(attn, grid, [0.0], mode="absolute")
    assert merged.shape == (16, 64)
    assert torch.allclose(merged, attn[grid[:, 0] * 8 + grid[:, 1]])  # nothing merged: each anchor's own map
    labels, _ = diffseg(attn, 4, [1e6] * 2, (8, 8))
    assert labels.unique().tolist() == [0]


def test_later_iterations_partition_the_maps():
    # four maps: 0 and 1 close, 2 and 3 close, the pairs far apart -> two groups, each map in exactly one
    base = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    maps = torch.stack([base[0], base[0] * 0.98 + 0.005, base[1], base[1] * 0.98 + 0.005])
    merged = _merge_once(maps, symmetric_kl(maps, maps, chunk=2), 0.05)
    assert merged.shape == (2, 4)
    assert torch.allclose(merged[0], maps[:2].mean(0)) and torch.allclose(merged[1], maps[2:].mean(0))


def test_relative_thresholds_are_quantiles_of_the_off_diagonal_kl():
    kl = torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    assert [resolve_threshold(kl, q, "relative") for q in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 2.0, 3.0])
    assert resolve_threshold(kl, 0.7, "absolute") == 0.7
    with pytest.raises(ValueError, match="quantiles"):
        resolve_threshold(kl, 1.5, "relative")


def test_relative_thresholds_adapt_to_nearly_uniform_attention():
    # a briefly trained model's attention is nearly uniform: every KL is tiny, so the threshold that
    # separates sharp regions merges everything, while a quantile of the image's own KLs still separates them
    regions = _three_regions()
    flat = _region_attention(regions, focus=0.02, noise=0.001)
    assert diffseg(flat, 4, [0.5] * 3, (8, 8), mode="absolute")[0].unique().tolist() == [0]
    labels, used = diffseg(flat, 4, [0.3] * 3, (8, 8), mode="relative")
    assert _same_partition(labels, regions)
    assert max(used) < 1e-2


def test_anchor_grid_matches_diffseg_and_rejects_grids_larger_than_the_map():
    grid = anchor_grid(64, 16)  # DiffSeg: step 63 // 15 = 4, start (63 - 60) // 2 = 1
    assert grid.shape == (256, 2)
    assert sorted(set(grid[:, 0].tolist())) == list(range(1, 62, 4))
    assert anchor_grid(8, 8)[:, 1].tolist()[:8] == list(range(8))
    with pytest.raises(ValueError, match="grid size between 1 and 8"):
        anchor_grid(8, 16)


def test_aggregation_weights_are_proportional_to_resolution():
    assert layer_weights([8, 4, 2]).tolist() == pytest.approx([8 / 14, 4 / 14, 2 / 14])
    gen = torch.Generator().manual_seed(1)
    fine = torch.rand(2, 64, 64, generator=gen).softmax(-1)
    coarse = torch.rand(2, 16, 16, generator=gen).softmax(-1)
    agg = aggregate_attention([fine, coarse])
    assert agg.shape == (2, 64, 64)
    assert torch.allclose(agg.sum(-1), torch.ones(2, 64), atol=1e-5)
    # expected by hand: keys upsampled bilinearly + renormalised, queries repeated 2x2
    keys = F.interpolate(coarse.reshape(32, 1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)
    keys = (keys / keys.sum((-2, -1), keepdim=True)).reshape(2, 4, 4, 64)
    up = keys.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 64)
    assert torch.allclose(agg, fine * 8 / 12 + up * 4 / 12, atol=1e-6)
    # fine query (row 3, col 5) takes its key map from coarse query (1, 2)
    assert torch.allclose(up[0, 3 * 8 + 5], keys[0, 1, 2])


def _three_level_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
    ).eval()


def test_capture_records_every_self_attention_and_leaves_the_unet_output_unchanged():
    unet = _three_level_unet()
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 16), torch.tensor([300, 300])
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=ctx).sample
        with capture_self_attention(unet) as store:
            captured = unet(x, t, encoder_hidden_states=ctx).sample
            kinds = {type(p) for n, p in unet.attn_processors.items() if not n.endswith("attn1.processor")}
        after = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(captured, reference, atol=1e-5)
    assert kinds == {AttnProcessor2_0}  # cross-attention stays on SDPA during capture
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())  # restored afterwards
    assert torch.equal(after, reference)
    sides = sorted(math.isqrt(m.shape[-1]) for m in store.values())
    assert sides == [4, 8, 8, 8, 16, 16, 16]  # down 16, 8; mid 4; up 8, 8, 16, 16
    assert all(n.endswith("attn1") for n in store)
    for m in store.values():
        assert m.shape[0] == 2 and (m >= 0).all()
        assert torch.allclose(m.sum(-1), torch.ones_like(m[..., 0]), atol=1e-5)
    agg = aggregate_attention(list(store.values()))
    assert agg.shape == (2, 256, 256)


def test_captured_map_is_the_head_mean_of_softmax_attention():
    unet = _three_level_unet()
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    hidden = torch.randn(1, 16, 32)
    store: dict = {}
    with torch.no_grad():
        out = SelfAttentionCapture("mid", store)(attn, hidden)
        assert torch.allclose(out, AttnProcessor2_0()(attn, hidden), atol=1e-5)
        q = attn.to_q(hidden).view(1, 16, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(hidden).view(1, 16, attn.heads, -1).transpose(1, 2)
        expected = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)
    assert torch.allclose(store["mid"], expected, atol=1e-6)


def test_label_map_upsamples_and_numbers_segments_consecutively():
    merged = torch.zeros(3, 4)  # 2x2 maps; map 1 never wins
    merged[0, [0, 2]] = 1.0  # left column
    merged[1] = 0.1
    merged[2, [1, 3]] = 1.0  # right column
    labels = label_map(merged, (4, 4), chunk=1)
    assert labels.unique().tolist() == [0, 1]
    assert (labels[:, :2] == 0).all() and (labels[:, 2:] == 1).all()
