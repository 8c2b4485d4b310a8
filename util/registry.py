"""Name -> factory registries for the model families, with one clear error for a wrong name."""
from __future__ import annotations

from typing import Callable, Dict


class ModelRegistry:
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: Dict[str, Callable] = {}

    def register(self, name: str, factory: Callable) -> None:
        if name in self._factories:
            raise KeyError(f"{self.kind} '{name}' registered twice")
        self._factories[name] = factory

    def names(self):
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def create(self, name: str, **kwargs):
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} '{name}'. Valid names: {', '.join(self.names())}")
        return self._factories[name](**kwargs)

    def merged(self, *others: "ModelRegistry") -> "ModelRegistry":
        out = ModelRegistry(self.kind)
        for reg in (self, *others):
            for name, fn in reg._factories.items():
                out.register(name, fn)
        return out


def pretrain_models() -> ModelRegistry:
    """All pretraining model names (MAE, Deblurring MAE, ConvMAE, Deblurring ConvMAE)."""
    from models_convmae import CONVMAE_MODELS
    from models_mae import MAE_MODELS
    return MAE_MODELS.merged(CONVMAE_MODELS)


def finetune_models() -> ModelRegistry:
    """All fine-tuning model names (ViT and ConvViT classifiers)."""
    from models_vit import FINETUNE_MODELS
    return FINETUNE_MODELS
