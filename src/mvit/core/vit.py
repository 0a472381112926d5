"""A Vision Transformer written here, configured like DeiT (Touvron et al., 2021).

Shapes: B images, C channels, H x W pixels, P patch size, N = (H/P)(W/P) patches, T = 1 + N tokens
(class token first), D width, h attention heads, Dh = D / h.

The architecture follows timm's `VisionTransformer` as DeiT uses it (pre-norm blocks, fused qkv with
bias, exact GELU, LayerNorm eps 1e-6, class-token pooling) so DeiT weights load exactly; the
parameter names are mvit's own, and `mvit.core.weights` maps between the two.

One file over 300 lines on purpose: the whole transformer, from patches to the pooled feature, reads
top to bottom in one place, as nanoGPT's model.py does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mvit.errors import ConfigError

LAYER_NORM_EPS = 1e-6


class ViTConfig(BaseModel):
    """Everything that decides the backbone's shape and regularisation. Stored in every model file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(default=224, gt=0)
    patch_size: int = Field(default=16, gt=0)
    in_channels: int = Field(default=3, gt=0)
    width: int = Field(default=768, gt=0)
    depth: int = Field(default=12, gt=0)
    num_heads: int = Field(default=12, gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)  # after attention projection, in the MLP, on embeddings
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
    drop_path: float = Field(default=0.0, ge=0, lt=1)  # stochastic depth of the last block; 0 at the first

    @model_validator(mode="after")
    def _shapes_fit(self) -> "ViTConfig":
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return self

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


NAMED_CONFIGS: dict[str, ViTConfig] = {
    "deit_tiny_patch16_224": ViTConfig(width=192, depth=12, num_heads=3),
    "deit_small_patch16_224": ViTConfig(width=384, depth=12, num_heads=6),
    "deit_base_patch16_224": ViTConfig(width=768, depth=12, num_heads=12),
}


def named_config(name: Union[str, ViTConfig], **overrides) -> ViTConfig:
    """A named DeiT configuration (or a given one), optionally changed (e.g. `image_size=160`, `drop_path=0.1`)."""
    if isinstance(name, ViTConfig):
        base, what = name, "the backbone"
    elif name in NAMED_CONFIGS:
        base, what = NAMED_CONFIGS[name], f"backbone {name!r}"
    else:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    try:
        return ViTConfig.model_validate({**base.model_dump(), **overrides})
    except ValueError as error:
        raise ConfigError(f"invalid settings for {what}: {error}") from None


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each to D: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(config.in_channels, config.width, config.patch_size, config.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.projection(images).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_width = config.width // config.num_heads
        self.scale = self.head_width**-0.5
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.out = nn.Linear(config.width, config.width)
        self.out_dropout = _dropout(config.dropout)

    def forward(self, x: Tensor, *, class_only: bool = False, keep_probabilities: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Tokens (B, T, D) -> (attention output (B, T, D), or (B, 1, D) for the class token alone;
        the attention probabilities (B, h, T', T), or None).

        `class_only`: keys and values still come from every token, but the query, the softmax and
        the output projection run for one token instead of T (the last block of a pooled forward).
        `keep_probabilities`: the explicit softmax, whose probabilities attention maps read;
        otherwise the fused kernel, which never materialises them.
        """
        B, T, D = x.shape
        h, Dh = self.num_heads, self.head_width
        if class_only:
            q = F.linear(x[:, :1], self.qkv.weight[:D], self.qkv.bias[:D]).reshape(B, 1, h, Dh).transpose(1, 2)
            k, v = F.linear(x, self.qkv.weight[D:], self.qkv.bias[D:]).reshape(B, T, 2, h, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self.qkv(x).reshape(B, T, 3, h, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, Dh)
        dropout = self.attention_dropout if self.training else 0.0
        if keep_probabilities:
            probabilities = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            attended = F.dropout(probabilities, dropout, self.training) @ v
        else:
            probabilities, attended = None, F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        B, h, T_out, Dh = attended.shape
        return self.out_dropout(self.out(attended.transpose(1, 2).reshape(B, T_out, h * Dh))), probabilities


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.width, config.mlp_width)
        self.activation = nn.GELU()  # exact erf GELU, as DeiT was trained with
        self.fc_out = nn.Linear(config.mlp_width, config.width)
        self.dropout = _dropout(config.dropout)

    def forward(self, x: Tensor, in_place: bool = False) -> Tensor:
        hidden = self.fc_in(x)  # (B, T, 4D)
        # in_place (inference only): GELU overwrites its input instead of filling a fresh (B, T, 4D)
        # buffer, whose first touch costs page faults on a CPU; bit-identical results
        hidden = torch.ops.aten.gelu_(hidden) if in_place else self.activation(hidden)
        return self.dropout(self.fc_out(self.dropout(hidden)))


def _dropout(rate: float) -> nn.Module:
    # An Identity costs nothing at inference; a zero-rate Dropout still costs a call per token batch.
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class DropPath(nn.Module):
    """Stochastic depth: during training, drop a residual branch for whole samples."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.attention = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, *, in_place: bool = False, class_only: bool = False,
                keep_attention: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Tokens (B, T, D) -> (the block's output (B, T, D), or (B, 1, D) for the class token alone;
        the attention probabilities (B, h, T, T) when `keep_attention`, else None).

        `in_place`: add the residual branches into `x` itself. Only for inference, by a caller that
        owns `x` (no autograd graph may need it)."""
        attended, probabilities = self.attention(self.attention_norm(x), class_only=class_only, keep_probabilities=keep_attention)
        if class_only:
            x = x[:, :1]  # a new (B, 1, D) view's sum below is a new tensor: safe whatever in_place says
        if in_place and not class_only:
            x += attended
        else:
            x = x + self.drop_path(attended)
        # free the attention output before the MLP runs, so the allocator hands its buffer to the
        # MLP's instead of a fresh one (a fresh buffer's first touch costs page faults on a CPU:
        # a deit_tiny batch of 32 took 1.22x as long without this)
        del attended
        if in_place and not class_only:
            x += self.mlp(self.mlp_norm(x), in_place=True)
            return x, probabilities
        return x + self.drop_path(self.mlp(self.mlp_norm(x))), probabilities


def resample_position_embedding(position_embedding: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubically resize the patch part of a (1, 1+N, D) position embedding to a new patch grid.

    Lets weights trained at one image size serve another, as DeiT does when fine-tuning at 384 px.
    """
    class_part, patch_part = position_embedding[:, :1], position_embedding[:, 1:]
    old = int(math.isqrt(patch_part.shape[1]))
    if old * old != patch_part.shape[1]:
        raise ValueError(f"position embedding of {patch_part.shape[1]} patches is not a square grid")
    if (old, old) == tuple(grid):
        return position_embedding
    D = patch_part.shape[-1]
    patches = patch_part.reshape(1, old, old, D).permute(0, 3, 1, 2).float()  # (1, D, old, old)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D).to(position_embedding.dtype)
    return torch.cat([class_part, patches], dim=1)


@dataclass
class Intermediates:
    """What one pass through the backbone gives (`VisionTransformer.forward_intermediates`)."""

    pooled: Tensor  # (B, D): the class token after the final norm
    tokens: Optional[Tensor] = None  # (B, T, D): every token after the final norm, when asked for
    tap: Optional[Tensor] = None  # (B, D): the mean patch token after the tapped block
    attentions: list[Tensor] = field(default_factory=list)  # depth x (B, h, T, T), when asked for


class VisionTransformer(nn.Module):
    """The backbone. `forward` returns the pooled class token (B, D)."""

    def __init__(self, config: Optional[ViTConfig] = None):
        super().__init__()
        self.config = config = config or ViTConfig()
        self.patch_embed = PatchEmbed(config)
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + config.grid_size**2, config.width))
        self.embedding_dropout = _dropout(config.dropout)
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()  # deeper blocks drop more
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.final_norm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.reset_parameters()

    @property
    def width(self) -> int:
        return self.config.width

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        nn.init.normal_(self.class_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> tokens (B, T, D): class token first, position embedding added."""
        patches = self.patch_embed(images)  # (B, N, D)
        grid = (images.shape[-2] // self.config.patch_size, images.shape[-1] // self.config.patch_size)
        position = self.position_embedding
        if grid != (self.config.grid_size, self.config.grid_size):
            position = resample_position_embedding(position, grid)
        tokens = torch.cat([self.class_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return self.embedding_dropout(tokens + position)

    def forward_intermediates(self, images: Tensor, *, tap: Optional[int] = None, all_tokens: bool = False,
                              attention: bool = False, in_place: Optional[bool] = None) -> Intermediates:
        """The one pass through the blocks that every other forward is (B, C, H, W) -> `Intermediates`.

        Without `all_tokens` and `attention` the last block computes the class token alone: its
        query, its MLP and the final norm run on 1 token instead of T, about a sixteenth of the
        backbone's work. `tap`: also the mean patch token after that block (counted from 1, short
        of the last), which the out-of-distribution gate reads. `attention`: every block's attention
        probabilities, from the explicit softmax. `in_place`: update the tokens in place (default:
        when no autograd graph or dropout needs them; never with `attention`).
        """
        class_only = not (all_tokens or attention)
        if tap is not None and not 1 <= tap < len(self.blocks):
            raise ValueError(f"a tap goes after block 1 to {len(self.blocks) - 1} of this backbone, not {tap}")
        in_place = (self._inference() if in_place is None else in_place) and not attention
        x = self.embed(images)  # (B, T, D)
        attentions, tapped = [], None
        for index, block in enumerate(self.blocks, start=1):
            last = index == len(self.blocks)
            x, probabilities = block(x, in_place=in_place, class_only=class_only and last, keep_attention=attention)
            if attention:
                attentions.append(probabilities)
            if index == tap:
                tapped = x[:, 1:].mean(dim=1)  # (B, T-1, D) -> (B, D); a new tensor, safe from in-place blocks
        x = self.final_norm(x)  # (B, T, D), or (B, 1, D) for the class token alone
        return Intermediates(pooled=x[:, 0], tokens=None if class_only else x, tap=tapped, attentions=attentions)

    def _inference(self) -> bool:
        # Without autograd (no_grad or inference_mode) and without dropout, the token tensor this
        # backbone made can be updated in place: fewer fresh buffers, same numbers.
        return not torch.is_grad_enabled() and not self.training

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> the pooled class token, (B, D); equal to `forward_features(images)[:, 0]`."""
        return self.forward_intermediates(images).pooled

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> every token after the final norm, (B, T, D)."""
        return self.forward_intermediates(images, all_tokens=True).tokens

    def forward_with_tap(self, images: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> (the pooled class token (B, D), the mean patch token after block `block` (B, D)), one pass."""
        found = self.forward_intermediates(images, tap=block)
        return found.pooled, found.tap

    def forward_with_attention(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Tokens (B, T, D) and every layer's attention probabilities, depth x (B, h, T, T)."""
        found = self.forward_intermediates(images, attention=True)
        return found.tokens, found.attentions

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups for gradual unfreezing, from the input side to the output side."""
        groups = {
            "patch_embed": list(self.patch_embed.parameters()),
            "position": [self.class_token, self.position_embedding],
        }
        for index, block in enumerate(self.blocks):
            groups[f"block.{index}"] = list(block.parameters())
        groups["final_norm"] = list(self.final_norm.parameters())
        return groups
