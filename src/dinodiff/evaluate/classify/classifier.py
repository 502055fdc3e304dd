"""The downstream classifier and its training recipe (DiNO-Diffusion, Section 4.3): DenseNet-121, batch 64,
AdamW (lr 1e-4, weight decay 1e-5), ReduceLROnPlateau (patience 10) on validation AUC, early stopping after 25
epochs without a validation-AUC gain, at most 150 epochs. Every value comes from `ClassifierSettings`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinodiff.data.augment import paper_augmentation
from dinodiff.devices import resolve_device
from dinodiff.evaluate.classify.settings import ClassifierSettings
from dinodiff.evaluate.classify.stats import macro_auc

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TinyCNN(nn.Module):
    """A four-block CNN for tests and quick CPU grids (~100k parameters)."""

    def __init__(self, num_labels: int, width: int = 24) -> None:
        super().__init__()
        layers, channels = [], 3
        for i in range(4):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _torchvision_weights_cached(name: str) -> bool:
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name).is_file()


def build_classifier(settings: ClassifierSettings, num_labels: int) -> tuple[nn.Module, str]:
    """(model taking (B, 3, S, S) ImageNet-normalised images, 'imagenet' or 'scratch').

    weights='auto' uses ImageNet weights only when they are already in torch's/timm's cache (no download);
    'imagenet' downloads them (an error when offline); 'none' trains from scratch.
    """
    name, wanted = settings.backbone, settings.weights
    if name == "tiny-cnn":
        return TinyCNN(num_labels), "scratch"
    if name.startswith("timm:"):
        import timm

        model_name = name.split(":", 1)[1]
        if wanted == "none":
            return timm.create_model(model_name, pretrained=False, num_classes=num_labels), "scratch"
        try:
            return timm.create_model(model_name, pretrained=True, num_classes=num_labels), "imagenet"
        except Exception as err:  # timm raises many kinds when weights cannot be fetched
            if wanted == "imagenet":
                raise RuntimeError(f"ImageNet weights for {model_name} could not be loaded ({err}); "
                                   "set classifier.weights=none to train from scratch.") from err
            logger.warning("no ImageNet weights for %s (%s): training from scratch", model_name, err)
            return timm.create_model(model_name, pretrained=False, num_classes=num_labels), "scratch"
    from torchvision.models import get_model

    use = wanted == "imagenet" or (wanted == "auto" and _torchvision_weights_cached(name))
    if wanted == "auto" and not use:
        logger.warning("ImageNet weights for %s are not cached in %s: training from scratch", name, torch.hub.get_dir())
    model = get_model(name, weights="DEFAULT" if use else None)
    _replace_head(model, num_labels)
    return model, "imagenet" if use else "scratch"


def _replace_head(model: nn.Module, num_labels: int) -> None:
    for attr in ("classifier", "fc", "head"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Linear(layer.in_features, num_labels))
            return
        if isinstance(layer, nn.Sequential) and isinstance(layer[-1], nn.Linear):
            layer[-1] = nn.Linear(layer[-1].in_features, num_labels)
            return
    raise ValueError(f"Cannot find the classification head of {type(model).__name__}; use a DenseNet/ResNet-style "
                     "torchvision model or timm:<name>.")


@dataclass
class Part:
    """Images of one role (train / val / test): image i is row `rows[i]` of array `which[i]`, with its targets."""

    which: np.ndarray
    rows: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


class ImageTable(Dataset):
    """A `Part` over uint8 (N, S, S) arrays; augmented (the same way for real and synthetic images) when asked."""

    def __init__(self, arrays: list[np.ndarray], part: Part, augment: bool) -> None:
        self.arrays, self.part = arrays, part
        self.targets = part.targets.astype(np.float32)
        self.transform = paper_augmentation() if augment else None

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.arrays[self.part.which[i]][self.part.rows[i]]))[None]
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.targets[i])


def _normalise(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = batch.to(device, non_blocking=True).float().div_(255).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _loader(table: ImageTable, settings: ClassifierSettings, device: torch.device, shuffle: bool,
            seed: int) -> DataLoader:
    workers = settings.num_workers if device.type == "cuda" else 0
    return DataLoader(table, batch_size=settings.batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scores, targets) over a loader, in its order."""
    model.eval()
    scores, targets = [], []
    for images, target in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(_normalise(images, device))
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(target.numpy())
    return np.concatenate(scores), np.concatenate(targets)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    amp: bool) -> float:
    """One pass over the training loader; returns the mean BCE loss."""
    model.train()
    loss_fn, total, count = nn.BCEWithLogitsLoss(), 0.0, 0
    for images, target in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(_normalise(images, device))
        loss = loss_fn(logits.float(), target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(target), count + len(target)
    return total / max(count, 1)


def fit_and_test(settings: ClassifierSettings, arrays: list[np.ndarray], train: Part, val: Part, test: Part,
                 seed: int) -> dict:
    """Train on `train`, early-stop on `val`'s macro AUC, score the best epoch's weights on `test`."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = resolve_device(settings.device)
    amp = settings.amp and device.type == "cuda"
    num_labels = train.targets.shape[1]
    model, weights = build_classifier(settings, num_labels)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=settings.plateau_factor,
                                                         patience=settings.plateau_patience)
    train_loader = _loader(ImageTable(arrays, train, settings.augment), settings, device, True, seed)
    val_loader = _loader(ImageTable(arrays, val, False), settings, device, False, seed)
    best, best_state, best_epoch, epoch, start = -np.inf, None, 0, 0, time.time()
    for epoch in range(1, settings.max_epochs + 1):
        train_one_epoch(model, train_loader, optimizer, device, amp)
        val_auc = macro_auc(*predict(model, val_loader, device, amp))
        val_auc = 0.5 if np.isnan(val_auc) else val_auc
        plateau.step(val_auc)
        if val_auc > best:
            best, best_state, best_epoch = val_auc, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= settings.early_stop_patience and epoch >= settings.min_epochs:
            break
    model.load_state_dict(best_state)
    test_loader = _loader(ImageTable(arrays, test, False), settings, device, False, seed)
    scores, targets = predict(model, test_loader, device, amp)
    return {"scores": scores, "targets": targets, "val_auc": float(best), "best_epoch": best_epoch, "epochs": epoch,
            "weights": weights, "train_images": len(train), "seconds": time.time() - start, "device": str(device)}
