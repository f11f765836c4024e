"""Target layers given as modules or dotted names."""
from __future__ import annotations

from torch import nn


def resolve_layer(model: nn.Module, target_layer: "str | nn.Module") -> nn.Module:
    """The submodule named by a dotted path, e.g. "layer4", "layer4.-1", "features.8".

    Integer parts index the children in order (negative from the end). A module
    is returned as is after checking that it belongs to ``model``.
    """
    if isinstance(target_layer, nn.Module):
        if not any(m is target_layer for m in model.modules()):
            raise ValueError(
                f"target_layer: expected a submodule of the model, got a "
                f"{type(target_layer).__name__} that is not part of it"
            )
        return target_layer
    if not isinstance(target_layer, str):
        raise TypeError(
            f"target_layer: expected a dotted layer name or nn.Module, "
            f"got {type(target_layer).__name__}"
        )
    if not target_layer:
        raise ValueError("target_layer: expected a layer name, got ''")

    module, path = model, []
    for part in target_layer.split("."):
        children = dict(module.named_children())
        if part in children:
            module = children[part]
        elif _is_int(part) and -len(children) <= int(part) < len(children):
            module = list(children.values())[int(part)]
        else:
            where = ".".join(path) or "the model"
            names = list(children)
            shown = names[:20] + (["..."] if len(names) > 20 else [])
            raise ValueError(
                f"target_layer: no layer {part!r} in {where} while resolving "
                f"{target_layer!r}; children there: {shown or 'none'}"
            )
        path.append(part)
    return module


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()
