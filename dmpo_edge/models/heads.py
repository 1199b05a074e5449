"""Exit heads: the DMPO bypass module, the high-order statistics predictor and the linear predictors.

Everything here exports to ONNX and builds in TensorRT: the covariance head is matmul, transpose,
reductions and one gather with constant indices (no eig/svd/triu on dynamic shapes), and its matrix
square root is a fixed number of Newton-Schulz iterations (the iSQRT-COV recipe).
"""

from __future__ import annotations

from .._lazy import require

torch = require("torch", "models")
nn = torch.nn
F = torch.nn.functional

__all__ = [
    "Bypass", "CovariancePredictor", "LinearPredictor", "FirstOrderPredictor", "newton_schulz_sqrt", "covariance",
    "upper_triangle_indices", "pool_features",
]


def pool_features(x):
    """Trunk features -> one vector per sample: the class token of a token sequence, the mean of a feature map."""
    if x.dim() == 3:  # N x T x D tokens (ViT): the class token, as timm's 'token' pooling
        return x[:, 0]
    return x.mean(dim=(2, 3))  # N x C x H x W


def upper_triangle_indices(d: int):
    """Flat indices (row-major) of the upper triangle of a d x d matrix, diagonal included: a constant gather."""
    rows, cols = torch.triu_indices(d, d)  # computed once at build time on a static size, never exported
    return rows * d + cols


def covariance(x):
    """N x M x d samples -> N x d x d covariance (1/M, centred) and its trace (N,)."""
    m = x.shape[1]
    xc = x - x.mean(dim=1, keepdim=True)
    cov = torch.matmul(xc.transpose(1, 2), xc) / m
    # trace = sum of squares / M: a reduction instead of a diagonal op, so it exports everywhere
    trace = (xc * xc).sum(dim=(1, 2)) / m
    return cov, trace


def newton_schulz_sqrt(a, iters: int, eye=None):
    """Square root of a batch of SPD matrices whose eigenvalues lie in (0, 1] (e.g. divided by their trace).

    Coupled Newton-Schulz iteration: Y -> sqrt(A), Z -> inverse sqrt(A), matmuls only.
    """
    d = a.shape[-1]
    if eye is None:
        eye = torch.eye(d, dtype=a.dtype, device=a.device)
    y = a
    z = eye.expand_as(a)
    three = 3.0 * eye
    for _ in range(int(iters)):
        t = 0.5 * (three - torch.matmul(z, y))
        y, z = torch.matmul(y, t), torch.matmul(t, z)
    return y


class Bypass(nn.Module):
    """DMPO bypass: the early predictor reads its own transformed copy of the shallow features.

    Residual bottleneck (zero-initialised up-projection, so it starts as the identity). The trunk keeps the
    untouched features; with ``detach`` the predictor's gradient never reaches the trunk at all.
    """

    def __init__(self, kind: str, channels: int, hidden: int, detach: bool = False):
        super().__init__()
        self.kind = kind
        self.detach = bool(detach)
        if kind == "tokens":
            self.norm = nn.LayerNorm(channels, eps=1e-6)
            self.down = nn.Linear(channels, hidden)
            self.up = nn.Linear(hidden, channels)
        else:
            self.down = nn.Conv2d(channels, hidden, 1)
            self.mix = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)  # cheap spatial context
            self.up = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        if self.detach:
            x = x.detach()
        if self.kind == "tokens":
            return x + self.up(F.gelu(self.down(self.norm(x))))
        return x + self.up(F.relu(self.mix(F.relu(self.down(x)))))


class CovariancePredictor(nn.Module):
    """High-order statistics predictor: reduce -> covariance -> trace norm -> Newton-Schulz sqrt -> triu -> linear."""

    def __init__(self, kind: str, channels: int, num_classes: int, dim: int = 32, iters: int = 5, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        self.dim = int(dim)
        self.iters = int(iters)
        if kind == "tokens":
            self.reduce = nn.Sequential(nn.Linear(channels, self.dim), nn.LayerNorm(self.dim, eps=1e-6), nn.ReLU())
        else:
            self.reduce = nn.Sequential(nn.Conv2d(channels, self.dim, 1, bias=False), nn.BatchNorm2d(self.dim), nn.ReLU())
        # constants, rebuilt from the config: not part of the state dict
        self.register_buffer("eye", torch.eye(self.dim), persistent=False)
        self.register_buffer("triu_index", upper_triangle_indices(self.dim), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.dim * (self.dim + 1) // 2, num_classes)

    def statistics(self, x):
        """Features -> N x d(d+1)/2 normalised second-order statistics."""
        x = self.reduce(x)
        if self.kind != "tokens":
            x = x.flatten(2).transpose(1, 2)  # N x HW x d
        cov, trace = covariance(x)
        trace = trace.clamp_min(1e-6).reshape(-1, 1, 1)
        root = newton_schulz_sqrt(cov / trace, self.iters, self.eye)
        root = root * torch.sqrt(trace)  # iSQRT-COV post-compensation
        return root.flatten(1).index_select(1, self.triu_index)

    def forward(self, x):
        return self.fc(self.dropout(self.statistics(x)))


class LinearPredictor(nn.Module):
    """Plain multi-exit head (the ablation): pool -> norm -> linear."""

    def __init__(self, kind: str, channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(self.norm(pool_features(x))))


class FirstOrderPredictor(nn.Module):
    """A first-order head with the capacity of a DMPO exit (the control for "is it the statistics or the size?").

    reduce (1x1 conv + BN + ReLU, or Linear + LayerNorm + ReLU on tokens) to ``width`` channels -> average pool
    (first-order statistics only) -> optional hidden layer of ``hidden`` units + ReLU -> linear classifier.
    :func:`dmpo_edge.models.matched.match_first_order` picks ``width`` and ``hidden`` so that parameters and
    FLOPs equal those of a bypass + covariance exit at the same place; everything exports like the other heads.
    """

    def __init__(self, kind: str, channels: int, num_classes: int, width: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        if kind == "tokens":
            self.reduce = nn.Sequential(nn.Linear(channels, width), nn.LayerNorm(width, eps=1e-6), nn.ReLU())
        else:
            self.reduce = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Sequential(nn.Linear(width, hidden), nn.ReLU()) if hidden > 0 else nn.Identity()
        self.fc = nn.Linear(hidden if hidden > 0 else width, num_classes)

    def forward(self, x):
        x = self.reduce(x)
        x = x.mean(dim=1) if self.kind == "tokens" else x.mean(dim=(2, 3))
        return self.fc(self.dropout(self.hidden(x)))
