"""Feature extractors for FID/KID behind one interface: images (B, 1, S, S) in [0, 1] -> features (B, D).

- ``xrv`` (default, the paper's): TorchXRayVision ``densenet121-res224-all``, tap ``features2`` (1024-d,
  ReLU + global average pool of the last dense block); XRV input normalisation, grey in [-1024, 1024],
  centre crop, 224x224. Weights come through xrv's own loader from its cache dir
  (``xrv.utils.get_cache_dir()`` = ``~/.torchxrayvision/models_data/`` unless a folder is given).
- ``inception``: torchvision Inception-v3 (ImageNet weights), tap ``avgpool`` (2048-d). Weights come
  through torchvision's own path (``$TORCH_HOME/hub/checkpoints/``) or a given state-dict file. These are
  not the TF-ported FID Inception weights, so values are not comparable with published Inception FIDs.
- ``dinov2`` / ``rad-dino``: the CLS token of a DINOv2-family encoder (``dinodiff.models.encoders``), tap ``cls``.

FIDs on different extractors or taps are not comparable: every result names ``extractor`` and ``tap``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinodiff.devices import resolve_device
from dinodiff.files import atomic_path
from dinodiff.models.encoders import load_encoder
from dinodiff.models.factory import resolve_encoder_path

EXTRACTORS = ("xrv", "inception", "dinov2", "rad-dino")
XRV_WEIGHTS = "densenet121-res224-all"
DINO_DEFAULTS = {"dinov2": "facebook/dinov2-base", "rad-dino": "microsoft/rad-dino"}


class MissingWeights(FileNotFoundError):
    """Extractor weights are not on disk (and may not be downloadable here); the message says where they go."""


def center_crop_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> grey (1, size, size): channel mean, centre square crop, antialiased bilinear resize."""
    grey = image.float().mean(dim=0, keepdim=True) if image.shape[0] != 1 else image.float()
    h, w = grey.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    grey = grey[:, top:top + side, left:left + side]
    if side != size:
        grey = F.interpolate(grey[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return grey.clamp(0, 1)


class FeatureExtractor(nn.Module):
    """Base class. Subclasses set ``name``, ``tap``, ``dim``, ``input_size``, ``weights`` and implement ``features``."""

    name: str
    tap: str
    dim: int
    input_size: int
    weights: str  # where the weights came from (file, folder or hub id), recorded with every result

    @property
    def key(self) -> str:
        """``extractor:tap``, e.g. ``xrv-densenet121-res224-all:features2``."""
        return f"{self.name}:{self.tap}"

    def describe(self) -> dict:
        return {"extractor": self.name, "tap": self.tap, "dim": self.dim, "input_size": self.input_size,
                "weights": self.weights}

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # frozen: batch norm and dropout always in eval mode

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> (B, dim) float32; other sizes are centre-cropped and resized first."""
        if images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != 1 or images.shape[-2:] != (self.input_size, self.input_size):
            images = torch.stack([center_crop_resize(im, self.input_size) for im in images])
        device = next(self.parameters()).device
        out = self.features(images.to(device, torch.float32)).float()
        if out.shape[1] != self.dim:
            raise RuntimeError(f"{self.key} returned {out.shape[1]} features, expected {self.dim}.")
        return out


# --------------------------------------------------------------------------------------------- XRV
def xrv_weights_file(weights: str = XRV_WEIGHTS, cache_dir: str | Path | None = None) -> Path:
    """The file xrv's loader reads for `weights`: its download name under `cache_dir` (default: xrv's cache dir)."""
    import torchxrayvision as xrv

    if weights not in xrv.models.model_urls:
        raise ValueError(f"Unknown TorchXRayVision weights {weights!r}; known: {sorted(xrv.models.model_urls)}.")
    folder = cache_dir if cache_dir is not None else xrv.utils.get_cache_dir()
    return Path(os.path.expanduser(str(folder))) / os.path.basename(xrv.models.model_urls[weights]["weights_url"])


class XRVExtractor(FeatureExtractor):
    """TorchXRayVision DenseNet-121 ``features2`` (the paper's FID features)."""

    tap, dim, input_size = "features2", 1024, 224

    def __init__(self, weights: str = XRV_WEIGHTS, cache_dir: str | Path | None = None):
        super().__init__()
        import torchxrayvision as xrv

        path = xrv_weights_file(weights, cache_dir)
        if not path.is_file():
            # xrv would try to download; this machine may be offline, so say exactly what is needed.
            url = xrv.models.model_urls[weights]["weights_url"]
            raise MissingWeights(f"TorchXRayVision weights not found at {path}. Download them with "
                                 f"`wget {url} -O {path}` (or pass the folder holding them as the weights "
                                 "directory, e.g. `--weights DIR`).")
        self.model = xrv.models.DenseNet(weights=weights, cache_dir=str(path.parent) + os.sep)
        self.name, self.weights = f"xrv-{weights}", str(path)
        self.model.eval().requires_grad_(False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # XRV normalisation: [0, 1] -> [-1024, 1024] (xrv.utils.normalize with maxval 1).
        return self.model.features2((2.0 * images - 1.0) * 1024.0)


def save_random_xrv_weights(cache_dir: str | Path, weights: str = XRV_WEIGHTS, seed: int = 0) -> Path:
    """Write a randomly initialised DenseNet-121 where xrv's loader looks for `weights` (tests, demos, offline runs).

    xrv's weight files are whole pickled modules (it calls ``torch.load(...).state_dict()``), so this saves one too.
    """
    import torchxrayvision as xrv

    path = xrv_weights_file(weights, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = xrv.models.DenseNet(num_classes=len(xrv.models.model_urls[weights]["labels"]))
    with atomic_path(path) as tmp:
        torch.save(model, tmp)
    return path


# --------------------------------------------------------------------------------------- Inception
def inception_weights_file() -> Path:
    """Where torchvision keeps Inception-v3's ImageNet weights: ``torch.hub.get_dir()/checkpoints/<file>``."""
    from torchvision.models import Inception_V3_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(Inception_V3_Weights.IMAGENET1K_V1.url)


class InceptionExtractor(FeatureExtractor):
    """torchvision Inception-v3, 2048-d average-pool features (inputs scaled to [-1, 1] as Google's weights expect)."""

    name, tap, dim, input_size = "inception-v3-torchvision", "avgpool", 2048, 299

    def __init__(self, weights_file: str | Path | None = None):
        super().__init__()
        from torchvision.models import inception_v3

        path = Path(weights_file) if weights_file else inception_weights_file()
        if not path.is_file():
            raise MissingWeights(f"Inception-v3 weights not found at {path}. Put torchvision's "
                                 "inception_v3_google-0cc3c7bd.pth there (it downloads to "
                                 "$TORCH_HOME/hub/checkpoints/) or pass a state-dict file as the weights.")
        model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.fc = nn.Identity()  # the tap: the pooled 2048-d vector before the classifier
        self.model, self.weights = model.eval().requires_grad_(False), str(path)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((2.0 * images - 1.0).expand(-1, 3, -1, -1))


def save_random_inception_weights(path: str | Path | None = None, seed: int = 0) -> Path:
    """Write a random Inception-v3 state dict (default: where torchvision looks for the ImageNet weights)."""
    from torchvision.models import inception_v3

    path = Path(path) if path else inception_weights_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


# ------------------------------------------------------------------------------------ DINOv2 family
class DinoExtractor(FeatureExtractor):
    """The CLS token of a DINOv2-family encoder (DINOv2, RAD-DINO), loaded by ``dinodiff.models.encoders``."""

    tap = "cls"

    def __init__(self, name: str, name_or_path: str):
        super().__init__()
        self.encoder = load_encoder(resolve_encoder_path(name_or_path), tokens=["cls"])
        self.name, self.weights = name, name_or_path
        self.dim, self.input_size = self.encoder.hidden_size, self.encoder.image_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[:, 0]


def build_extractor(name: str = "xrv", weights: str | None = None,
                    device: str | torch.device = "cpu") -> FeatureExtractor:
    """An extractor by name; `weights` is xrv's cache folder, Inception's state-dict file, or a DINO hub id/folder."""
    if name == "xrv":
        extractor: FeatureExtractor = XRVExtractor(cache_dir=weights)
    elif name == "inception":
        extractor = InceptionExtractor(weights)
    elif name in DINO_DEFAULTS:
        extractor = DinoExtractor(name, weights or DINO_DEFAULTS[name])
    else:
        raise ValueError(f"Unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}.")
    return extractor.to(resolve_device(device)).eval()

