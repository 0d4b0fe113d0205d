"""The tiny default's vision tower: CLIP's vision transformer behind a small convolutional stem.

A ViT's patch embedding is one linear map per 8 x 8 patch, which must tell a shape's outline from
its colour and the background tint at once. Three 3 x 3 stride-2 convolutions in its place (Xiao et
al. 2021, "Early convolutions help transformers see better") find edges and corners first, so the
transformer sees per-patch outline features instead of raw pixels. Measured on one H100
(benchmarks/TINY_DEFAULT.md): at a pretraining learning rate of 3e-3 neither embedding learned shapes
(patch 46 %, this stem 40 % after 2,500 steps); at 1e-3 this stem reaches 99 %. The learning rate was
the decisive change; the linear patch embedding at 1e-3 has not been measured, and stays available
as `TinyModelConfig.vision_stem="patch"`.

Everything else is CLIP's code (`CLIPVisionModel`): the class token, position embeddings, encoder,
and the hidden states LLaVA reads. The config registers under its own `model_type` with
transformers' Auto classes when this module is imported (vlmtune.models imports it), so the saved
tiny model loads with `AutoModelForImageTextToText.from_pretrained` and no remote code.
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel

MODEL_TYPE = "vlmtune_conv_stem_vit"


@strict
class ConvStemVisionConfig(CLIPVisionConfig):
    model_type = MODEL_TYPE

    stem_channels: int = 64  # channels of the stem's last hidden convolution; earlier ones halve


class ConvStem(nn.Module):
    """log2(patch_size) stride-2 3 x 3 convolutions: one output position per patch, as CLIP's patch embedding."""

    def __init__(self, config: ConvStemVisionConfig):
        super().__init__()
        n_convs = int(math.log2(config.patch_size))
        if 2**n_convs != config.patch_size:
            raise ValueError(f"the convolutional stem needs a power-of-two patch size, not {config.patch_size}")
        widths = [config.num_channels] + [config.stem_channels // 2 ** (n_convs - 2 - i) for i in range(n_convs - 1)] + [config.hidden_size]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            last = index == n_convs - 1  # the projection to the token width: no bias, no activation, as CLIP's
            layers.append(nn.Conv2d(width_in, width_out, kernel_size=3, stride=2, padding=1, bias=not last))
            if not last:
                layers.append(nn.GELU())
        self.convs = nn.Sequential(*layers)

    @property
    def weight(self):
        # CLIPVisionEmbeddings casts pixels to `patch_embedding.weight.dtype`
        return self.convs[0].weight

    def forward(self, pixel_values):
        return self.convs(pixel_values)


class ConvStemVisionModel(CLIPVisionModel):
    config_class = ConvStemVisionConfig

    def __init__(self, config: ConvStemVisionConfig):
        super().__init__(config)
        self.embeddings.patch_embedding = ConvStem(config)
        self.post_init()


AutoConfig.register(MODEL_TYPE, ConvStemVisionConfig, exist_ok=True)
AutoModel.register(ConvStemVisionConfig, ConvStemVisionModel, exist_ok=True)
