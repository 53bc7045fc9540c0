"""`CrossViT(config)`: the dual-branch classifier of Chen, Fan and Panda (ICCV 2021).

Numerics and parameter names follow timm's `CrossVit`, so timm and official checkpoints load
unchanged (the official `pos_embed.0` layout is mapped by `load_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CrossViTConfig
from .layers import MultiScaleBlock, PatchEmbed

__all__ = ["CrossViT", "resize_to_branch"]


def resize_to_branch(x: Tensor, size: int) -> Tensor:
    """Rescale a (B, C, H, W) batch to one branch's square input size; a no-op when it already fits."""
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    # bicubic, align_corners=False, antialias=False, as timm's scale_image (spec §c1, §f1)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


class CrossViT(nn.Module):
    """CrossViT with Lucid's config API and timm's numerics.

    Branch 0 reads `img_size[0]` px with `patch_size[0]` patches (240 / 12 in the presets),
    branch 1 `img_size[1]` px with `patch_size[1]` (224 / 16).
    """

    def __init__(self, config: CrossViTConfig) -> None:
        super().__init__()
        if not isinstance(config, CrossViTConfig):
            raise TypeError(f"CrossViT takes a CrossViTConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.num_classes = c.num_classes
        self.num_features = c.num_features

        self.patch_embed = nn.ModuleList(
            PatchEmbed(c.patch_size[i], c.in_channels, c.embed_dim[i], c.multi_conv) for i in range(2)
        )
        # Separate attributes, not a ParameterList, to keep timm's key names (cls_token_0, pos_embed_0).
        self.cls_token_0 = nn.Parameter(torch.zeros(1, 1, c.embed_dim[0]))
        self.cls_token_1 = nn.Parameter(torch.zeros(1, 1, c.embed_dim[1]))
        self.pos_embed_0 = nn.Parameter(torch.zeros(1, 1 + c.num_patches[0], c.embed_dim[0]))
        self.pos_embed_1 = nn.Parameter(torch.zeros(1, 1 + c.num_patches[1], c.embed_dim[1]))
        self.pos_drop = nn.Dropout(c.drop_rate)

        # Stochastic depth: linspace over sum(b1 + fusion) entries; stage k takes the next
        # max(b0, b1) + fusion of them (spec §c8, as timm and IBM).
        # A stage with more branch-0 than branch-1 blocks runs past the table; it repeats the last rate.
        total = sum(d[1] + d[2] for d in c.depth)  # >= 1: branch-1 depths are positive
        rates = [c.drop_path_rate * i / max(1, total - 1) for i in range(total)]  # linspace, device-free
        start = 0
        blocks = []
        for triple in c.depth:
            span = max(triple[0], triple[1]) + triple[2]
            stage_rates = (rates[start:start + span] + [rates[-1]] * span)[:span]
            start += span
            blocks.append(MultiScaleBlock(
                c.embed_dim, triple, c.num_heads, c.mlp_ratio, c.qkv_bias, c.layer_norm_eps,
                drop_path=stage_rates, qk_scale=c.qk_scale, drop=c.drop_rate,
                attn_drop=c.attn_drop_rate,
            ))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.ModuleList(nn.LayerNorm(c.embed_dim[i], eps=c.layer_norm_eps) for i in range(2))
        self.head = nn.ModuleList(
            nn.Linear(c.embed_dim[i], c.num_classes) if c.num_classes > 0 else nn.Identity() for i in range(2)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Training-from-scratch init of timm (trunc normal .02); checkpoints overwrite all of it."""
        for p in (self.cls_token_0, self.cls_token_1, self.pos_embed_0, self.pos_embed_1):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def branch_inputs(self, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-branch inputs: a single (B, C, H, W) batch is rescaled to each branch's size;
        a pair of tensors must already be at the branch sizes."""
        sizes = self.config.img_size
        if isinstance(x, Tensor):
            if x.ndim != 4 or x.shape[1] != self.config.in_channels:
                raise ValueError(
                    f"expected a (B, {self.config.in_channels}, H, W) tensor, got shape {tuple(x.shape)}"
                )
            return resize_to_branch(x, sizes[0]), resize_to_branch(x, sizes[1])
        if len(x) != 2:
            raise ValueError(f"expected one tensor per branch (2), got {len(x)}")
        for i, t in enumerate(x):
            expected = (self.config.in_channels, sizes[i], sizes[i])
            if t.ndim != 4 or tuple(t.shape[1:]) != expected:
                raise ValueError(f"branch {i} input must be (B, *{expected}), got {tuple(t.shape)}")
        return x[0], x[1]

    def _embed(self, inputs: tuple[Tensor, Tensor]) -> list[Tensor]:
        tokens = []
        params = ((self.cls_token_0, self.pos_embed_0), (self.cls_token_1, self.pos_embed_1))
        for embed, (cls, pos), x in zip(self.patch_embed, params, inputs, strict=True):
            t = embed(x)  # (B, N_i, D_i)
            t = torch.cat((cls.expand(t.shape[0], -1, -1), t), dim=1) + pos  # (B, 1 + N_i, D_i)
            tokens.append(self.pos_drop(t))
        return tokens

    def forward_features(self, x: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """Per-branch CLS features after the final norms: [(B, D0), (B, D1)]."""
        tokens = self._embed(self.branch_inputs(x))  # [(B, 1 + 400, D0), (B, 1 + 196, D1)]
        for block in self.blocks:
            tokens = block(tokens)
        # LayerNorm is per token, so norming the CLS token alone equals timm's norm-then-slice.
        return [norm(t[:, 0]) for norm, t in zip(self.norm, tokens, strict=True)]

    def branch_logits(self, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Each branch head's logits, [(B, C), (B, C)]; features when num_classes is 0."""
        f0, f1 = self.forward_features(x)
        return self.head[0](f0), self.head[1](f1)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """Mean of the branch logits, the number published accuracy refers to; with
        `num_classes=0`, the concatenated CLS features (B, D0 + D1) instead."""
        if self.num_classes == 0:
            return torch.cat(self.forward_features(x), dim=-1)
        return torch.stack(self.branch_logits(x)).mean(dim=0)
