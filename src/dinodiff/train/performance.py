"""How the trainer uses a GPU: optimizer choice, memory format, torch.compile, TF32 and the SDPA backend.

Every knob is a `train.*` / `optim.*` config field and is logged when it takes effect. On a CPU they are
off (channels-last only when asked for, no TF32, no fused optimizer): CPU runs stay what they were.

- channels_last (`train.channels_last`, None = on CUDA): UNet and autoencoder weights in NHWC, the layout
  tensor-core convolutions want. Saved weights are made contiguous again (safetensors refuses NHWC strides).
- compile (`train.compile`): `torch.compile` of the UNet's forward in place (`nn.Module.compile`, so its
  state_dict keys and save_pretrained are unchanged). "default" or "max-autotune-no-cudagraphs": a training
  step of 200-300 ms gains little from CUDA graphs, which need a step free of host syncs and of changing
  shapes, so the graph-capturing modes are not offered.
- TF32 (`train.tf32`): for the fp32 frozen encoder/autoencoder and the fp32 parts of the step.
- SDPA backend (`train.sdpa_backend`): auto lets PyTorch choose; flash / efficient / cudnn / math force one
  (benchmarks/gpu measures them; choose by that measurement).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dinodiff.config import TrainOptimSettings, TrainRunSettings
from dinodiff.models.factory import Components, enable_tf32

logger = logging.getLogger(__name__)

COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def make_optimizer(params, cfg: TrainOptimSettings, on_cuda: bool) -> torch.optim.Optimizer:
    """bitsandbytes AdamW8bit (the paper's) when asked for and usable, else torch AdamW (fused on CUDA)."""
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                  eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional dependency: imported only when asked for
        except ImportError:
            logger.warning("optim.use_8bit_adam: bitsandbytes is not installed, using torch.optim.AdamW.")
        else:
            if on_cuda:
                logger.info("optimizer: bitsandbytes AdamW8bit")
                return bnb.optim.AdamW8bit(params, **kwargs)
            logger.warning("optim.use_8bit_adam needs CUDA; using torch.optim.AdamW on this device.")
    fused = bool(cfg.fused and on_cuda)
    logger.info("optimizer: torch.optim.AdamW%s", " (fused CUDA kernel)" if fused else "")
    return torch.optim.AdamW(params, fused=fused, **kwargs) if fused else torch.optim.AdamW(params, **kwargs)


def _contiguous_state_dict(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


def use_channels_last(module: torch.nn.Module) -> None:
    """NHWC weights for `module`; its state_dict still gives contiguous (NCHW) tensors, as safetensors needs."""
    module.to(memory_format=torch.channels_last)
    module._register_state_dict_hook(_contiguous_state_dict)


def tune_components(parts: Components, tcfg: TrainRunSettings, device: torch.device) -> None:
    """Apply train.tf32, train.channels_last and train.compile to the models the trainer built."""
    on_cuda = device.type == "cuda"
    if on_cuda and tcfg.tf32:
        enable_tf32()
        torch.backends.cudnn.benchmark = True  # fixed shapes in training: let cuDNN pick its fastest kernels
        logger.info("TF32 matmuls and convolutions on; cuDNN benchmark on")
    channels_last = on_cuda if tcfg.channels_last is None else bool(tcfg.channels_last)
    if channels_last:
        for module in (parts.unet, parts.autoencoder):
            use_channels_last(module)
        logger.info("UNet and autoencoder weights in channels-last memory format")
    if tcfg.compile not in COMPILE_MODES:
        raise ValueError(f"train.compile={tcfg.compile!r}: use one of {', '.join(COMPILE_MODES)}.")
    if tcfg.compile != "none":
        parts.unet.compile(mode=tcfg.compile)
        logger.info("torch.compile of the UNet, mode %s (the first steps compile it)", tcfg.compile)


@contextlib.contextmanager
def sdpa_backend(choice: str) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to one backend (`auto`: PyTorch's own choice)."""
    if choice == "auto":
        yield
        return
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if choice not in backends:
        raise ValueError(f"train.sdpa_backend={choice!r}: use one of {', '.join(SDPA_BACKENDS)}.")
    with sdpa_kernel(backends[choice]):
        yield
