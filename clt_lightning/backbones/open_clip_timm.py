"""open_clip models whose vision tower is a timm trunk (SigLIP, SigLIP2).

open_clip's `TimmModel` runs `head(trunk(x))`: a timm `VisionTransformer` (SigLIP: no
[CLS] token, attention-pool "map" head) and open_clip's projection `head` (often empty).
The blocks are the trunk's, run as in `timm_vit.TimmTower`; the features are the trunk's
full output (its classifier doubles as open_clip's projection when one is configured)
followed by open_clip's head, which equals `clip.encode_image`.
"""

from __future__ import annotations

from open_clip.timm_model import TimmModel
from torch import Tensor, nn

from clt_lightning.backbones.timm_vit import TimmTower


class OpenClipTimm(TimmTower):
    """Adapter for an open_clip CLIP / CustomTextCLIP whose `visual` is a `TimmModel`.

    Args:
        model: The whole open_clip model (its text tower serves zero-shot heads).

    Raises:
        ConfigError: The trunk is not a timm VisionTransformer of standard blocks.
    """

    family = "open_clip"
    has_text_tower = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, model.visual.trunk, pre_logits=False)

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        """Whether `model` is an open_clip model with a timm vision tower."""
        return isinstance(getattr(model, "visual", None), TimmModel)

    def head(self, h: Tensor) -> Tensor:
        return self.model.visual.head(super().head(h))

    def reference_forward(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)
