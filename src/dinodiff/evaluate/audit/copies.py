"""Near-copy search in pixel space: a candidate descriptor, then registration of each candidate, in torch.

A copy of a training image may come back disguised: rotated a few degrees, zoomed (0.9-1.1), shifted (~5%),
with another gamma or contrast, JPEG-compressed. The distance of two images is measured after undoing that:

1. **Equalise** each image (uint8 histogram -> mid-rank in [0, 1]): any monotone intensity map (gamma, contrast,
   brightness, windowing) gives back the same image, except where it clips.
2. **Working image**: the equalised image shrunk to WORK x WORK (antialiased) and blurred (sigma BLUR px).
3. **Candidates**: a DESCRIPTOR x DESCRIPTOR crop of the central (1 - 2 MARGIN) of the working image, blurred and
   standardised; a query is described in VIEWS (rotations x zooms x shifts, the query only) and a training image
   in one; the k training images nearest over the views are the candidates (neighbours.NearestSearch).
4. **Registration** of the query onto each candidate over a similarity transform (rotation, zoom, shift): the
   best of the GRID of starts (rotations x zooms x shifts), then STEPS Adam steps on all four parameters; the
   distance is the L2 between the two standardised CROP x CROP central crops once aligned.

The DCR of a query is the smallest registered distance over its candidates. The calibration references are
computed by the same two steps, so thresholds stay comparable. Only the top-k candidates are registered: the
cost is linear in the training set size (one descriptor per training image).
"""

from __future__ import annotations

import logging
import math
from itertools import product

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

logger = logging.getLogger(__name__)

WORK, DESCRIPTOR, CROP = 32, 16, 24  # working image, candidate descriptor and registration crop sides (px)
MARGIN = 0.125  # the border left out of every comparison (fill brought in by a rotation, shift or zoom)
BLUR = 1.0  # sigma in working-image pixels
STEPS, LEARNING_RATE = 30, 0.01
REFINE = 4  # candidates per query refined by gradient steps after the grid


def _similarities(angles: tuple[float, ...], zooms: tuple[float, ...],
                  shifts: list[tuple[float, float]]) -> torch.Tensor:
    """(G, 4) parameters (angle in radians, log zoom, shift x, shift y in fractions of the side x 2)."""
    return torch.tensor([[math.radians(a), math.log(z), 2 * dx, 2 * dy]
                         for a, z, (dx, dy) in product(angles, zooms, shifts)], dtype=torch.float32)


VIEWS = _similarities((-4.0, 0.0, 4.0), (0.93, 1.0, 1.07),
                      [(0.0, 0.0), (0.03, 0.0), (-0.03, 0.0), (0.0, 0.03), (0.0, -0.03)])
GRID = _similarities((-6.0, -3.0, 0.0, 3.0, 6.0), (0.9, 1.0, 1.1),
                     [(dx, dy) for dx in (-0.05, 0.0, 0.05) for dy in (-0.05, 0.0, 0.05)])
IDENTITY = torch.zeros(1, 4)

SEARCH = (f"equalised (rank of each grey level), blurred {WORK}x{WORK} thumbnails; candidates: the nearest "
          f"{DESCRIPTOR}x{DESCRIPTOR} central crops over {len(VIEWS)} views of the query (rotation +-4 deg, zoom "
          f"0.93-1.07, shift +-3%); each candidate registered over rotation, zoom and shift ({len(GRID)} starts: "
          f"+-6 deg, zoom 0.9-1.1, shift +-5%; then {STEPS} Adam steps for the {REFINE} nearest); distance: L2 of "
          f"the standardised {CROP}x{CROP} central crops once aligned, the smallest over the candidates")


def equalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W): each grey level replaced by its mid-rank in the image, in [0, 1]."""
    flat = images.reshape(len(images), -1).long()
    hist = torch.zeros(len(images), 256, device=images.device).scatter_add_(1, flat, torch.ones_like(flat).float())
    mid_rank = (hist.cumsum(1) - hist / 2) / flat.shape[1]
    return mid_rank.gather(1, flat).reshape(len(images), 1, *images.shape[1:])


def working(images: torch.Tensor, side: int = WORK, blur: float = BLUR) -> torch.Tensor:
    """uint8 (B, H, W) -> (B, 1, side, side): equalised, shrunk (antialiased) and blurred."""
    small = F.interpolate(equalise(images), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return gaussian_blur(small, kernel_size=2 * math.ceil(3 * blur) + 1, sigma=blur) if blur > 0 else small


def _affine(params: torch.Tensor, margin: float) -> torch.Tensor:
    """(P, 4) similarity parameters -> (P, 2, 3) affine_grid matrices onto the central (1 - 2 margin) square."""
    angle, log_zoom, tx, ty = params.unbind(1)
    scale = (1 - 2 * margin) * torch.exp(log_zoom)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def crops(work: torch.Tensor, params: torch.Tensor, side: int, margin: float = MARGIN) -> torch.Tensor:
    """(P, 1, R, R) working images seen through (P, 4) similarities -> (P, side*side), each standardised."""
    grid = F.affine_grid(_affine(params.to(work), margin), [len(work), 1, side, side], align_corners=False)
    flat = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False).flatten(1)
    return (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)


def descriptors(work: torch.Tensor, views: torch.Tensor = IDENTITY) -> torch.Tensor:
    """(B, 1, R, R) working images -> (B, V, DESCRIPTOR**2): the central crop in each view."""
    b, v = len(work), len(views)
    return crops(work.repeat_interleave(v, 0), views.repeat(b, 1), DESCRIPTOR).reshape(b, v, -1)


def register(query: torch.Tensor, candidates: torch.Tensor, steps: int = STEPS,
             refine: int = REFINE) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of each query to each of its candidates once aligned, and the similarity found.

    query (Q, 1, R, R) and candidates (Q, k, 1, R, R) working images -> ((Q, k) distances, (Q, k, 4) parameters).
    Every pair starts from the best of the GRID; the `refine` candidates nearest after that are refined by Adam.
    """
    n, k = candidates.shape[:2]
    target = crops(candidates.flatten(0, 1), IDENTITY.expand(n * k, 4), CROP).reshape(n, k, -1)
    grid = GRID.to(query.device)
    with torch.no_grad():
        warped = crops(query.repeat_interleave(len(grid), 0), grid.repeat(n, 1), CROP).reshape(n, len(grid), -1)
        coarse, start = torch.cdist(warped, target).min(1)  # (Q, k): the best start of each pair
    params = grid[start]  # (Q, k, 4)
    chosen = coarse.topk(min(refine, k), dim=1, largest=False).indices  # (Q, r)
    rows = torch.arange(n, device=query.device)[:, None].expand_as(chosen)
    refined, moved = _refine(query[rows.reshape(-1)], target[rows, chosen].reshape(chosen.numel(), -1),
                             params[rows, chosen].reshape(-1, 4), steps)
    better = refined < coarse[rows, chosen].reshape(-1)  # Adam may overshoot: keep the start when it was nearer
    distances, params = coarse.clone(), params.clone()
    distances[rows, chosen] = torch.where(better, refined, coarse[rows, chosen].reshape(-1)).reshape(chosen.shape)
    params[rows, chosen] = torch.where(better[:, None], moved, params[rows, chosen].reshape(-1, 4)).reshape(
        *chosen.shape, 4)
    return distances, params


def _refine(moving: torch.Tensor, fixed: torch.Tensor, start: torch.Tensor,
            steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` Adam steps on the similarity (P, 4) that brings each moving image onto its fixed crop."""
    params = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([params], lr=LEARNING_RATE)
    with torch.enable_grad():
        for _ in range(steps):
            optimiser.zero_grad()
            ((crops(moving, params, CROP) - fixed) ** 2).sum().backward()
            optimiser.step()
    with torch.no_grad():
        return (crops(moving, params, CROP) - fixed).norm(dim=1), params.detach()
