"""Name -> factory registries of the model families, with one clear error for a wrong name.

As timm's ``_registry.py`` + ``@register_model``: this module imports nothing of the repository. The
model files register their named factories into it when they are imported::

    @register_pretrain_model
    def dmae_vit_base_patch16(**kwargs): ...

and a caller imports the model modules it needs, then creates models by name::

    import models_convmae  # registers the MAE and ConvMAE pretraining models (it imports models_mae)
    model = pretrain_models().create("dmae_vit_base_patch16", img_size=224)

Pretraining models come from ``models_mae`` and ``models_convmae``, fine-tuning models from ``models_vit``.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence


class ModelRegistry:
    """Factories of one kind of model by name; ``register`` is a decorator, the name the function's."""

    def __init__(self, kind: str, modules: Sequence[str]):
        self.kind = kind
        self.modules = tuple(modules)  # the modules that fill it, named in the error of an empty registry
        self._factories: Dict[str, Callable] = {}

    def register(self, factory: Callable) -> Callable:
        name = factory.__name__
        if name in self._factories:
            raise KeyError(f"{self.kind} '{name}' registered twice")
        self._factories[name] = factory
        return factory

    def names(self):
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def create(self, name: str, **kwargs):
        if name not in self._factories:
            raise ValueError(self.unknown_name_message(name))
        return self._factories[name](**kwargs)

    def unknown_name_message(self, name: str) -> str:
        if not self._factories:  # a caller that forgot to import the model modules
            return (f"unknown {self.kind} '{name}': no {self.kind}s are registered yet; import "
                    f"{' and '.join(self.modules)} before creating one")
        return f"unknown {self.kind} '{name}'. Valid names: {', '.join(self.names())}"


PRETRAIN_MODELS = ModelRegistry("pretraining model", modules=("models_mae", "models_convmae"))
FINETUNE_MODELS = ModelRegistry("fine-tuning model", modules=("models_vit",))
register_pretrain_model = PRETRAIN_MODELS.register
register_finetune_model = FINETUNE_MODELS.register


def pretrain_models() -> ModelRegistry:
    """The pretraining model names (MAE, Deblurring MAE, ConvMAE, Deblurring ConvMAE) of the model
    modules imported so far."""
    return PRETRAIN_MODELS


def finetune_models() -> ModelRegistry:
    """The fine-tuning model names (ViT and ConvViT classifiers) of the model modules imported so far."""
    return FINETUNE_MODELS
