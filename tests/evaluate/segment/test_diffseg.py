"""DiffSeg maths and attention capture: KL merging on hand-built maps, aggregation, capture == SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from dinodiff.evaluate.segment.attention import SelfAttentionCapture, capture_self_attention
from dinodiff.evaluate.segment.diffseg import (
    _merge_once,
    aggregate_attention,
    anchor_grid,
    diffseg,
    label_map,
    layer_weights,
    merge_attention,
    resolution_weights,
    resolve_threshold,
    symmetric_kl,
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


def test_later_iterations_partition_the_maps_when_far_apart():
    # four maps: 0 and 1 close, 2 and 3 close, the pairs far apart -> two groups, each map in exactly one
    base = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    maps = torch.stack([base[0], base[0] * 0.98 + 0.005, base[1], base[1] * 0.98 + 0.005])
    merged = _merge_once(maps, symmetric_kl(maps, maps, chunk=2), 0.05)
    assert merged.shape == (2, 4)
    assert torch.allclose(merged[0], maps[:2].mean(0)) and torch.allclose(merged[1], maps[2:].mean(0))


def _chain_of_three_maps() -> tuple[torch.Tensor, torch.Tensor]:
    # A - B - C on a line: A~B and B~C within the threshold, A and C not
    maps = torch.tensor([[0.70, 0.10, 0.10, 0.10], [0.55, 0.25, 0.10, 0.10], [0.40, 0.40, 0.10, 0.10]])
    kl = symmetric_kl(maps, maps)
    assert kl[0, 1] < 0.1 and kl[1, 2] < 0.1 and kl[0, 2] > 0.1
    return maps, kl


def test_later_iterations_follow_google_diffseg_and_may_reuse_matched_maps():
    # google/diffseg mask_merge(iter>0): C, not yet matched, averages every map within the threshold,
    # including B, which A's group already took
    maps, kl = _chain_of_three_maps()
    merged = _merge_once(maps, kl, 0.1)
    assert merged.shape == (2, 4)
    assert torch.allclose(merged[0], maps[:2].mean(0)) and torch.allclose(merged[1], maps[1:].mean(0))


def test_partition_option_keeps_each_map_in_one_group():
    maps, kl = _chain_of_three_maps()
    merged = _merge_once(maps, kl, 0.1, overlap=False)
    assert torch.allclose(merged[0], maps[:2].mean(0)) and torch.allclose(merged[1], maps[2])
    attn = _region_attention(_three_regions(), noise=0.2)
    with pytest.raises(ValueError, match="later_merges"):
        merge_attention(attn, anchor_grid(8, 4), [0.1, 0.1], later_merges="bogus")


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


def test_sd15_layout_weights_each_resolution_not_each_layer():
    # SD 1.5: 5 self-attention maps at 64, 32 and 16 (2 down + 3 up), 1 at 8 (mid)
    sides = [64] * 5 + [32] * 5 + [16] * 5 + [8]
    assert resolution_weights(sides) == pytest.approx({64: 64 / 120, 32: 32 / 120, 16: 16 / 120, 8: 8 / 120})
    w = layer_weights(sides)
    assert w[-1].item() == pytest.approx(8 / 120)  # 0.067 (a weight per layer would give it 8/568 = 0.014)
    assert w[0].item() == pytest.approx(64 / 600)
    assert w.sum().item() == pytest.approx(1.0)


def _upsampled(m: torch.Tensor, size: int) -> torch.Tensor:
    """Hand computation for ONE map (B, s*s, s*s): keys upsampled + renormalised, queries repeated."""
    b, s = m.shape[0], math.isqrt(m.shape[-1])
    r = size // s
    keys = F.interpolate(m.reshape(b * s * s, 1, s, s), size=(size, size), mode="bilinear", align_corners=False)
    keys = (keys / keys.sum((-2, -1), keepdim=True)).reshape(b, s, s, size * size)
    return keys.repeat_interleave(r, 1).repeat_interleave(r, 2).reshape(b, size * size, size * size)


def test_aggregation_averages_layers_per_resolution_then_weights_resolutions_sd15_layout():
    # SD 1.5's layout scaled down 8x: 5 maps at 8, 4 and 2, and one 1x1 map (the mid block's)
    gen = torch.Generator().manual_seed(3)
    maps = [torch.rand(2, s * s, s * s, generator=gen).mul(4).softmax(-1) for s in [8] * 5 + [4] * 5 + [2] * 5]
    maps.append(torch.ones(2, 1, 1))
    agg = aggregate_attention(maps)
    assert agg.shape == (2, 64, 64)
    assert torch.allclose(agg.sum(-1), torch.ones(2, 64), atol=1e-5)
    # by hand: mean of the (upsampled) maps of each resolution, resolutions weighted 8:4:2:1 / 15
    expected = torch.zeros(2, 64, 64)
    for side, weight in ((8, 8 / 15), (4, 4 / 15), (2, 2 / 15)):
        group = [_upsampled(m, 8) for m in maps if m.shape[-1] == side * side]
        assert len(group) == 5
        expected += weight * torch.stack(group).mean(0)
    expected += (1 / 15) * torch.full((2, 64, 64), 1 / 64)  # the 1x1 map upsampled: uniform over keys
    assert torch.allclose(agg, expected, atol=1e-6)
    # the mid block's single map weighs as much as a whole resolution's mean: 1/15, not 1/(5*(8+4+2)+1) = 1/71
    without_mid = aggregate_attention(maps[:-1], weights={8: 8 / 15, 4: 4 / 15, 2: 2 / 15})
    assert torch.allclose(agg - without_mid, torch.full((2, 64, 64), 1 / 15 / 64), atol=1e-6)


def test_aggregation_does_not_depend_on_layer_order():
    gen = torch.Generator().manual_seed(4)
    maps = [torch.rand(1, s * s, s * s, generator=gen).softmax(-1) for s in (4, 2, 4, 2, 2)]
    a = aggregate_attention(maps)
    b = aggregate_attention(maps[::-1])
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="no aggregation weight"):
        aggregate_attention(maps, weights={4: 1.0})


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
