"""DINO self-distillation parts: backbone + lightly head, student and EMA teacher, schedules.

DINO is Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers". The objective
and its parts come from lightly (`DINOLoss`: teacher centring + sharpening, cross-entropy over every
(teacher global, student other) view pair; `DINOProjectionHead`; `update_momentum`; `cosine_schedule`),
installed without its training-framework dependencies (pytorch-lightning, hydra-core): only these
torch modules and functions are used.

A backbone is any ViT that the encoder loader (`dinodiff.models.encoders`) reads: by default a new
transformers `Dinov2WithRegistersModel` (CLS + R registers + patches), or a transformers ViT/DINOv2 or
timm ViT to continue from. The DINO feature is its final CLS token; registers are trained through
attention and saved with it.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from dinodiff.encoder.settings import (
    BackboneSettings,
    EncoderPretrainSettings,
    HeadSettings,
)
from dinodiff.models.encoders import is_timm_source, load_encoder

logger = logging.getLogger(__name__)


@dataclass
class Backbone:
    model: nn.Module
    family: str  # transformers-vit | transformers-dinov2 | timm (as in dinodiff.models.encoders)
    embed_dim: int
    mean: list[float]
    std: list[float]


def new_backbone(b: BackboneSettings, mean: list[float], std: list[float]) -> Backbone:
    """A randomly initialised transformers Dinov2(WithRegisters)Model of the configured size."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    common = dict(hidden_size=b.hidden_size, num_hidden_layers=b.num_layers, num_attention_heads=b.num_heads,
                  mlp_ratio=b.mlp_ratio, image_size=b.image_size, patch_size=b.patch_size,
                  drop_path_rate=b.drop_path, layerscale_value=1.0)
    if b.num_registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=b.num_registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    return Backbone(model, "transformers-dinov2", b.hidden_size, list(mean), list(std))


def pretrained_backbone(b: BackboneSettings) -> Backbone:
    """Continue from a hub id / local folder, loaded by the same code that loads conditioning encoders."""
    name = str(b.name_or_path)
    library = b.library if b.library != "auto" else ("timm" if is_timm_source(name) else "transformers")
    enc = load_encoder(name, library, image_size=b.image_size)
    model = enc.model
    if enc.family == "timm":  # local crops have another size: switch on what timm's dynamic_img_size=True sets
        from timm.layers import Format

        model.dynamic_img_size = True
        model.patch_embed.strict_img_size, model.patch_embed.flatten = False, False
        model.patch_embed.output_fmt = Format.NHWC
    model.requires_grad_(True)
    return Backbone(model, enc.family, enc.hidden_size, enc.mean.flatten().tolist(), enc.std.flatten().tolist())


def cls_token(backbone: nn.Module, family: str, x: torch.Tensor) -> torch.Tensor:
    """Final (normed) CLS token (B, D) of normalised images x (B, 3, s, s), any s that is a patch multiple."""
    if family == "timm":
        return backbone.forward_features(x)[:, 0]
    kwargs = {"interpolate_pos_encoding": True} if family == "transformers-vit" else {}
    return backbone(pixel_values=x, **kwargs).last_hidden_state[:, 0]


def make_head(embed_dim: int, h: HeadSettings) -> DINOProjectionHead:
    return DINOProjectionHead(embed_dim, h.hidden_dim, h.bottleneck_dim, h.output_dim, batch_norm=h.batch_norm,
                              freeze_last_layer=h.freeze_last_layer_steps, norm_last_layer=h.norm_last_layer)


def set_teacher_mode(teacher: "DINONet") -> None:
    """Teacher backbone in eval mode (no drop path); its head in train mode, so that BatchNorm (when the head has
    it) normalises with the batch's statistics as the student's does (DINO's teacher)."""
    teacher.eval()
    teacher.head.train()


class DINONet(nn.Module):
    """Backbone + projection head; grey crops in [0, 1] are normalised as the saved encoder will do."""

    def __init__(self, backbone: Backbone, head: DINOProjectionHead) -> None:
        super().__init__()
        self.backbone, self.head, self.family = backbone.model, head, backbone.family
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, s, s) in [0, 1] -> CLS embeddings (B, D)."""
        x = crops.expand(-1, 3, -1, -1) if crops.shape[1] == 1 else crops
        return cls_token(self.backbone, self.family, (x - self.mean) / self.std)

    def forward(self, crops: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Crops of one or more sizes -> (head outputs per crop, CLS embeddings of the crops of the first size).

        Crops of the same size go through the backbone together (DINO's MultiCropWrapper)."""
        outputs: list[torch.Tensor | None] = [None] * len(crops)
        first_embeddings = None
        for size in dict.fromkeys(c.shape[-1] for c in crops):
            group = [i for i, c in enumerate(crops) if c.shape[-1] == size]
            emb = self.embed(torch.cat([crops[i] for i in group]))
            if first_embeddings is None:
                first_embeddings = emb
            for i, out in zip(group, self.head(emb).chunk(len(group))):
                outputs[i] = out
        return outputs, first_embeddings  # type: ignore[return-value]


def build_student_teacher(s: EncoderPretrainSettings, mean: list[float], std: list[float]) -> tuple[DINONet, DINONet]:
    """A student and a teacher with identical weights; the teacher is frozen and in eval mode.

    `copy.deepcopy` cannot copy lightly's head (torch weight_norm), so the teacher's head is built fresh and
    loaded from the student's state; the backbone is deep-copied."""
    backbone = pretrained_backbone(s.backbone) if s.backbone.name_or_path else new_backbone(s.backbone, mean, std)
    student = DINONet(backbone, make_head(backbone.embed_dim, s.head))
    teacher_backbone = Backbone(copy.deepcopy(backbone.model), backbone.family, backbone.embed_dim, backbone.mean,
                                backbone.std)
    teacher = DINONet(teacher_backbone, make_head(backbone.embed_dim, s.head))
    teacher.head.load_state_dict(student.head.state_dict())
    teacher.requires_grad_(False)
    set_teacher_mode(teacher)
    return student, teacher


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (lightly)."""
    update_momentum(student, teacher, m=momentum)


def momentum_at(step: int, max_steps: int, start: float, end: float) -> float:
    """Teacher EMA momentum: cosine from `start` to `end` over the run (DINO's schedule, via lightly)."""
    return float(cosine_schedule(step, max(max_steps, 2), start, end))


def teacher_temp_at(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warm-up of the teacher temperature from `start` to `end` (DINO), then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` (DINO's lr schedule, per step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, none on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "token" in name or "position" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def normalised_std(embeddings: torch.Tensor) -> float:
    """Per-dimension std of L2-normalised embeddings, times sqrt(D): ~1 when spread, 0 when collapsed."""
    z = F.normalize(embeddings.float(), dim=-1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[-1]))
