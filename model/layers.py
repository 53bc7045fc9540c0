"""CrossViT building blocks, with timm's module names so state_dicts load unchanged.

Shapes in comments use B = batch, N = tokens (1 + patches), D = width, h = heads, d = D / h.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "CrossAttention",
    "CrossAttentionBlock",
    "DropPath",
    "Mlp",
    "MultiScaleBlock",
    "PatchEmbed",
]


class DropPath(nn.Module):
    """Stochastic depth per sample (training only); identity at eval."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class PatchEmbed(nn.Module):
    """Image to patch tokens; `multi_conv` is the "dagger" three-conv stem (spec §c2)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int, multi_conv: bool) -> None:
        super().__init__()
        self.proj: nn.Module
        if not multi_conv:
            self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        elif patch_size == 12:  # 240 -> 60 -> 20 -> 20
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, embed_dim // 4, kernel_size=7, stride=4, padding=3),
                nn.ReLU(inplace=True),
                nn.Conv2d(embed_dim // 4, embed_dim // 2, kernel_size=3, stride=3, padding=0),
                nn.ReLU(inplace=True),
                nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=1, padding=1),
            )
        elif patch_size == 16:  # 224 -> 56 -> 28 -> 14
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, embed_dim // 4, kernel_size=7, stride=4, padding=3),
                nn.ReLU(inplace=True),
                nn.Conv2d(embed_dim // 4, embed_dim // 2, kernel_size=3, stride=2, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            )
        else:  # CrossViTConfig rejects this earlier; kept for direct use of the layer
            raise ValueError(f"multi_conv supports patch sizes 12 and 16, got {patch_size}")

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D), raster order


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by SDPA."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, d) each, heads before tokens as in timm
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, h, N, d) -> (B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as the weights were trained with
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block (timm `Block` without LayerScale or q/k-norm)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = _drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = _drop_path(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
    """One query (the CLS token) attends to all tokens, itself included; cost linear in N."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        h, d = self.num_heads, D // self.num_heads
        q = self.wq(x[:, :1]).reshape(B, h, d)
        if self.training and self.attn_drop > 0.0:
            # Dropped attention weights no longer sum to 1, which the folded form relies on.
            k = self.wk(x).reshape(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
            v = self.wv(x).reshape(B, N, h, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2), k, v, dropout_p=self.attn_drop, scale=self.scale
            ).reshape(B, h, d)
        else:
            # With a single query, wk folds into the query and wv moves after the weighted sum,
            # so keys and values are the tokens themselves: N*D*h work instead of 2*N*D*D.
            # Exact: q.bk is the same for every key (softmax ignores it) and the weights sum
            # to 1 (bv passes through). The h heads become h queries of one SDPA head.
            wk = self.wk.weight.view(h, d, D)
            wv = self.wv.weight.view(h, d, D)
            q_in = torch.einsum("bhd,hdc->bhc", q, wk).unsqueeze(1)  # (B, 1, h, D)
            tokens = x.unsqueeze(1)  # (B, 1, N, D)
            ctx = F.scaled_dot_product_attention(q_in, tokens, tokens, scale=self.scale).squeeze(1)  # (B, h, D)
            out = torch.einsum("bhc,hdc->bhd", ctx, wv)  # (B, h, d)
            if self.wv.bias is not None:
                out = out + self.wv.bias.view(h, d)
        return self.proj_drop(self.proj(out.reshape(B, 1, D)))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention with a residual on the CLS token only and no MLP (timm, IBM)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        eps: float,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :1] + self.drop_path(self.attn(self.norm1(x)))  # (B, 1, D)


def _projection(dim_in: int, dim_out: int, eps: float) -> nn.Sequential:
    # LayerNorm -> GELU -> Linear, always: timm and IBM disable the Identity shortcut for equal widths.
    return nn.Sequential(nn.LayerNorm(dim_in, eps=eps), nn.GELU(), nn.Linear(dim_in, dim_out))


class MultiScaleBlock(nn.Module):
    """Self-attention in each branch, then each branch's CLS token reads the other branch's patches."""

    def __init__(
        self,
        dims: tuple[int, int],
        depth: tuple[int, int, int],
        num_heads: tuple[int, int],
        mlp_ratio: Sequence[float],
        qkv_bias: bool,
        eps: float,
        drop_path: Sequence[float],
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(*[
                Block(dims[i], num_heads[i], mlp_ratio[i], qkv_bias, eps, drop, attn_drop, drop_path[n])
                for n in range(depth[i])
            ])
            for i in range(2)
        )
        self.projs = nn.ModuleList(_projection(dims[i], dims[1 - i], eps) for i in range(2))

        def fusion_block(width: int, heads: int) -> CrossAttentionBlock:
            return CrossAttentionBlock(width, heads, qkv_bias, eps, qk_scale, drop, attn_drop, drop_path[-1])

        # fusion[i] writes into branch 1 - i's width. A third depth entry of 0 means one bare block;
        # n > 0 a Sequential of n (which changes the state_dict keys), as in timm and IBM.
        self.fusion = nn.ModuleList(
            fusion_block(dims[1 - i], num_heads[1 - i]) if depth[2] == 0
            else nn.Sequential(*[fusion_block(dims[1 - i], num_heads[1 - i]) for _ in range(depth[2])])
            for i in range(2)
        )
        self.revert_projs = nn.ModuleList(_projection(dims[1 - i], dims[i], eps) for i in range(2))

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        x = [blocks(t) for blocks, t in zip(self.blocks, x, strict=True)]  # [(B, N0, D0), (B, N1, D1)]
        cls = [proj(t[:, :1]) for proj, t in zip(self.projs, x, strict=True)]  # [(B, 1, D1), (B, 1, D0)]
        out = []
        for i, (fusion, revert) in enumerate(zip(self.fusion, self.revert_projs, strict=True)):
            # both directions read the pre-fusion tokens, so they are independent of each other
            fused = fusion(torch.cat((cls[i], x[1 - i][:, 1:]), dim=1))  # (B, 1, D_other)
            out.append(torch.cat((revert(fused), x[i][:, 1:]), dim=1))  # (B, N_i, D_i)
        return out
