"""Swin-Factorizer of the FACTORIZER member (``factorizer.SegmentationFactorizer``), rewritten for loading.

Same U-Net skeleton as :mod:`models.factorizer.resunet` (stem, 2^3 strided-conv downsampling,
transposed-conv upsampling, 3 heads); every conv block is a :class:`FactorizerBlock` working on a
fixed 64^3 input (64, 32, 16, 8, 4 voxels per axis at levels 0..4). Parameter names equal those of
the official checkpoints without the Lightning ``net.`` prefix (official: 141 tensors,
5,624,547 parameters, 9 x (u0 (8,1) + v0 (64,1)) = 648 buffer values).

FactorizerBlock, in order (``P`` = the block):

- ``P.adapter`` (decoder only): ``Sequential(Linear1x1(2W -> W, no bias), Dropout)``;
- ``P.pos_embed`` (bottleneck only, encoder level 4): ``x + pos`` then Dropout;
- ``P.blocks.nmf = Residual(Sequential(ChannelLayerNorm, NMFSubblock))``;
- ``P.blocks.mlp = Residual(Sequential(ChannelLayerNorm, MLP))``.

NMFSubblock: ``in_proj`` (1x1, no bias) -> shifted-window matricization (heads of 8 channels,
channel = head*8 + d; windows of 4^3 with the grid index major on each axis; 4 copies rolled by
0, 1, 2, 3 voxels along the three axes, stacked on the batch axis; each window gives an 8 x 64
matrix, columns ordered (p0, p1, p2) row-major) -> ReLU -> rank-1 NMF, 5 HALS iterations from the
buffers ``u0``/``v0`` (``U = relu((XV + eps)/(V'V + eps))`` then ``V = relu((X'U + eps)/(U'U + eps))``,
eps 1e-8), reconstruction ``U V'`` -> inverse matricization (undo each roll, average the copies)
-> ``out_proj`` (1x1, bias) -> Dropout. MLP: 1x1 W->2W, GELU, Dropout, 1x1 2W->W, Dropout.
All dropouts have p = 0.1 (the official configuration).

Dropout layers are :class:`SeededDropout`: ordinary ``nn.Dropout`` unless a ``torch.Generator`` is
attached (:func:`attach_generator`), in which case masks are drawn from that generator, so a
prediction in train mode is reproducible for a given seed whatever the thread count and the
caller's global RNG state.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.factorizer.resunet import IN_CHANNELS, OFFICIAL_WIDTHS, OUT_CHANNELS, UNetSkeleton

SPATIAL_SIZE = 64
HEAD_DIM = 8
PATCH = 4
SHIFTS = (0, 1, 2, 3)
RANK = 1
NUM_ITERS = 5
EPS = 1e-8
DROPOUT = 0.1
MLP_RATIO = 2


class SeededDropout(nn.Dropout):
    """``nn.Dropout`` that draws its masks from an attached generator when one is set.

    Same semantics as ``nn.Dropout`` (keep with probability 1-p, scale by 1/(1-p), identity in
    eval mode). Masks come from ``torch.rand(..., generator=g)`` (a serial CPU kernel: the result
    does not depend on the number of threads).
    """

    generator: torch.Generator | None = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            return F.dropout(x, self.p, True, self.inplace)
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def attach_generator(module: nn.Module, generator: torch.Generator | None) -> int:
    """Attach ``generator`` to every :class:`SeededDropout` in ``module``; returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, SeededDropout):
            m.generator = generator
            n += 1
    return n


class Linear1x1(nn.Module):
    """Channels-first linear layer: ``Conv1d(kernel 1)`` over the flattened voxels (key ``linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Conv1d(in_features, out_features, kernel_size=1, bias=bias)

    def forward(self, x):
        shape = x.shape
        w = self.linear.weight[..., 0]
        flat = x.reshape(shape[0], shape[1], -1)
        if self.linear.bias is not None:   # one GEMM per sample (faster than Conv1d on the CPU)
            out = torch.stack([torch.addmm(self.linear.bias[:, None], w, f) for f in flat])
        else:
            out = torch.matmul(w, flat)
        return out.reshape(shape[0], -1, *shape[2:])


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a channels-first tensor (key ``norm``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        out = self.norm(x.movedim(1, -1).contiguous())
        return out.movedim(-1, 1).contiguous()


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PosEmbed(nn.Module):
    """Learned positional embedding ``pos`` (1, C, *spatial), added, then dropout."""

    def __init__(self, dim: int, spatial: Sequence[int], dropout: float = DROPOUT):
        super().__init__()
        self.pos = nn.Parameter(torch.empty(1, dim, *spatial))
        nn.init.normal_(self.pos, std=1.0)
        self.dropout = SeededDropout(dropout)

    def forward(self, x):
        return self.dropout(x + self.pos)


# ----------------------------------------------------------------------------- matricization
_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def window_index(spatial: Sequence[int], shift: int, patch: int = PATCH, device=None) -> torch.Tensor:
    """Flat voxel indices that put ``roll(x, (shift,)*3)`` in window order.

    Entry k of the result, k enumerating ``(g0, g1, g2, p0, p1, p2)`` row-major (window index major,
    then position inside the 4^3 window), is the flat index into the *unrolled* volume of the voxel
    found at that place after the roll: ``roll(x, s)[i] = x[(i - s) mod n]``, ``i = g * patch + p``.
    """
    key = (tuple(int(n) for n in spatial), int(shift), int(patch), str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        axes = []
        for n in spatial:
            g, p = torch.meshgrid(torch.arange(n // patch), torch.arange(patch), indexing="ij")
            axes.append(((g * patch + p - shift) % n))              # (G_a, P_a)
        i0, i1, i2 = axes
        n1, n2 = spatial[1], spatial[2]
        flat = (i0[:, None, None, :, None, None] * (n1 * n2) + i1[None, :, None, None, :, None] * n2
                + i2[None, None, :, None, None, :])                  # (g0, g1, g2, p0, p1, p2)
        idx = flat.reshape(-1).to(device)
        _INDEX_CACHE[key] = idx
    return idx


def sw_matricize(x: torch.Tensor, head_dim: int = HEAD_DIM, patch: int = PATCH,
                 shifts: Sequence[int] = SHIFTS) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (S*B*H, G, head_dim, patch^3): the official shifted-window matricization.

    Copy s is ``torch.roll(x, (s, s, s), dims=(2, 3, 4))``, copies stacked on the leading axis
    (``(s, b, h)``, s major); ``out[(s,b,h), g]`` is the matrix of head h (rows d: channel h*8 + d)
    and window g ((g0, g1, g2) row-major), columns the window voxels (p0, p1, p2) row-major, i.e.
    ``b (h d) (g0 p0) (g1 p1) (g2 p2) -> (b h) (g0 g1 g2) d (p0 p1 p2)`` for each copy.
    """
    b, c, *sp = x.shape
    if c % head_dim or any(n % patch for n in sp):
        raise ValueError(f"cannot matricize {tuple(x.shape)} with head_dim {head_dim}, patch {patch}")
    h = c // head_dim
    g = (sp[0] // patch) * (sp[1] // patch) * (sp[2] // patch)
    flat = x.reshape(b, c, -1)
    out = torch.stack([flat.index_select(2, window_index(sp, s, patch, x.device)) for s in shifts], 0)
    out = out.reshape(len(shifts) * b * h, head_dim, g, patch ** 3).transpose(1, 2)
    return out.contiguous()


def sw_dematricize(m: torch.Tensor, shape: Sequence[int], head_dim: int = HEAD_DIM, patch: int = PATCH,
                   shifts: Sequence[int] = SHIFTS) -> torch.Tensor:
    """Inverse of :func:`sw_matricize`: undo each copy's roll and average the copies."""
    b, c, *sp = shape
    g = m.shape[1]
    copies = m.transpose(1, 2).reshape(len(shifts), b, c, g * patch ** 3)
    out = torch.zeros(b, c, sp[0] * sp[1] * sp[2], dtype=m.dtype, device=m.device)
    for k, s in enumerate(shifts):
        out.index_add_(2, window_index(sp, s, patch, m.device), copies[k])
    return (out / len(shifts)).reshape(b, c, *sp)


# ----------------------------------------------------------------------------- NMF
class UniformInit(nn.Module):
    """The NMF starting factors: buffers ``u0`` (M, R) and ``v0`` (N, R), uniform [0, 1) at creation."""

    def __init__(self, m: int, n: int, rank: int = RANK):
        super().__init__()
        self.register_buffer("u0", torch.empty(m, rank).uniform_())
        self.register_buffer("v0", torch.empty(n, rank).uniform_())


def hals_rank1(x: torch.Tensor, u0: torch.Tensor, v0: torch.Tensor, num_iters: int = NUM_ITERS,
               eps: float = EPS) -> torch.Tensor:
    """Rank-1 NMF by HALS of the matrices ``x`` (..., M, N); returns the reconstruction U V'.

    Starts from ``u0`` (M, 1), ``v0`` (N, 1) (broadcast over the batch axes); each iteration
    ``U = relu((X V + eps) / (V'V + eps))``, then ``V = relu((X'U + eps) / (U'U + eps))``
    (the official ``CoordinateDescent`` with ReLU projection for rank 1; ``u0`` is only the
    starting value, overwritten by the first U update).
    """
    if u0.shape[-1] != 1 or v0.shape[-1] != 1:
        raise ValueError("hals_rank1 handles rank 1 only")
    batch = x.shape[:-2]
    m, n = x.shape[-2:]
    u = u0.to(x.dtype).expand(*batch, m, 1)
    v = v0.to(x.dtype).expand(*batch, n, 1)
    xt = x.transpose(-2, -1)
    for _ in range(num_iters):
        u = torch.relu((torch.matmul(x, v) + eps) / ((v * v).sum(-2, keepdim=True) + eps))
        v = torch.relu((torch.matmul(xt, u) + eps) / ((u * u).sum(-2, keepdim=True) + eps))
    return torch.matmul(u, v.transpose(-2, -1))


class NMF(nn.Module):
    """Rank-1 NMF with HALS, ``init.u0``/``init.v0`` buffers (the official ``NMF(init='uniform')``)."""

    def __init__(self, m: int = HEAD_DIM, n: int = PATCH ** 3, rank: int = RANK, num_iters: int = NUM_ITERS,
                 eps: float = EPS):
        super().__init__()
        if rank != 1:
            raise ValueError("only rank 1 is implemented (the official configuration)")
        self.num_iters, self.eps = num_iters, eps
        self.init = UniformInit(m, n, rank)

    def forward(self, x):
        return hals_rank1(x, self.init.u0, self.init.v0, self.num_iters, self.eps)


class NMFSubblock(nn.Module):
    def __init__(self, dim: int, dropout: float = DROPOUT, head_dim: int = HEAD_DIM, patch: int = PATCH,
                 shifts: Sequence[int] = SHIFTS):
        super().__init__()
        self.head_dim, self.patch, self.shifts = head_dim, patch, tuple(shifts)
        self.in_proj = Linear1x1(dim, dim, bias=False)
        self.act = nn.ReLU()
        self.factorize = NMF(head_dim, patch ** 3)
        self.out_proj = Linear1x1(dim, dim, bias=True)
        self.dropout = SeededDropout(dropout)

    def forward(self, x):
        out = self.in_proj(x)
        shape = out.shape
        out = self.act(sw_matricize(out, self.head_dim, self.patch, self.shifts))
        out = self.factorize(out)
        out = sw_dematricize(out, shape, self.head_dim, self.patch, self.shifts)
        return self.dropout(self.out_proj(out))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int = MLP_RATIO, dropout: float = DROPOUT):
        super().__init__()
        hidden = int(ratio * dim)
        self.block = nn.Sequential(Linear1x1(dim, hidden), nn.GELU(), SeededDropout(dropout),
                                   Linear1x1(hidden, dim), SeededDropout(dropout))

    def forward(self, x):
        return self.block(x)


class FactorizerBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, spatial: Sequence[int], pos_embed: bool = False,
                 dropout: float = DROPOUT):
        super().__init__()
        if in_channels != out_channels:
            self.adapter = nn.Sequential(Linear1x1(in_channels, out_channels, bias=False), SeededDropout(dropout))
        if pos_embed:
            self.pos_embed = PosEmbed(in_channels, spatial, dropout)
        self.blocks = nn.ModuleDict({
            "nmf": Residual(nn.Sequential(ChannelLayerNorm(out_channels), NMFSubblock(out_channels, dropout))),
            "mlp": Residual(nn.Sequential(ChannelLayerNorm(out_channels), MLP(out_channels, MLP_RATIO, dropout))),
        })

    def forward(self, x):
        if hasattr(self, "adapter"):
            x = self.adapter(x)
        if hasattr(self, "pos_embed"):
            x = self.pos_embed(x)
        for block in self.blocks.values():
            x = block(x)
        return x


class SwinFactorizer(UNetSkeleton):
    """The FACTORIZER Swin-Factorizer; input must be exactly ``spatial_size``^3 (64^3)."""

    def __init__(self, widths: Sequence[int] = OFFICIAL_WIDTHS, in_channels: int = IN_CHANNELS,
                 out_channels: int = OUT_CHANNELS, spatial_size: int = SPATIAL_SIZE, dropout: float = DROPOUT):
        widths = tuple(int(w) for w in widths)
        n = len(widths)
        strides = (1,) + (2,) * (n - 1)
        side0 = int(spatial_size)
        if side0 % (PATCH * 2 ** (n - 1)):
            raise ValueError(f"spatial_size {side0} must be a multiple of {PATCH * 2 ** (n - 1)}")

        def block(index, a, b):
            level = min(index, 2 * n - 2 - index)       # encoder 0..n-1, decoder n-2..0
            side = side0 // (2 ** level)
            return FactorizerBlock(a, b, (side,) * 3, pos_embed=(index == n - 1), dropout=dropout)

        super().__init__(block, widths, strides, in_channels, out_channels)
        self.spatial_size = side0

    def forward(self, x):
        if tuple(x.shape[2:]) != (self.spatial_size,) * 3:
            raise ValueError(f"Swin-Factorizer input must be {self.spatial_size}^3, got {tuple(x.shape[2:])}")
        return super().forward(x)
