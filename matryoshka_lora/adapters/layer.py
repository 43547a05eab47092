"""`LoRALinear`: a frozen nn.Linear plus a nested-rank LoRA update.

    training (no inference rank set):   y = base(x) + alpha * ((x @ lora_A) * lora_p) @ lora_B
    inference at per-token ranks r_t:   y_t = base(x_t) + alpha * s_{r_t} * c_{r_t} * (x_t @ lora_A[:, :r_t]) @ lora_B[:r_t]
                                        (r_t = 0: base alone; c_r = rank_scales.get(r, 1), the fitted serving scale)

lora_A is [in_features, r_max], lora_B is [r_max, out_features]; the first r columns of A and rows of
B form the rank-r adapter. The layer keeps the base Linear's own `weight` / `bias` Parameters, so the
model's state-dict names of the base weights do not change when LoRA is injected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from matryoshka_lora.adapters.p import build_p, check_r_max, check_scaling, served_scale
from matryoshka_lora.errors import ConfigError, InvalidRankError, is_int

Ranks = int | torch.Tensor | None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r_max: int, scaling: str = "none", alpha: float = 1.0):
        super().__init__()
        check_r_max(r_max)
        check_scaling(scaling)
        if not isinstance(base, nn.Linear):
            raise ConfigError("LoRA base module", type(base).__name__, "torch.nn.Linear")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ConfigError("alpha", alpha, "a finite number > 0")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r_max, self.scaling, self.alpha = r_max, scaling, float(alpha)
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.in_features, r_max, **factory))
        self.lora_B = nn.Parameter(torch.zeros(r_max, self.out_features, **factory))
        self.register_buffer(
            "lora_p", build_p("lora", r_max, (r_max,), scaling).to(base.weight.device), persistent=False
        )
        self.inference_ranks: Ranks = None
        self.rank_scales: dict[int, float] = {}  # c_r of the manifest's per-rank serving scale
        self.reset_lora_parameters()

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A like PEFT's A (Kaiming-uniform, a=sqrt(5), on the [r_max, in] transpose); B zeros."""
        a_t = torch.empty(self.r_max, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a_t, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.copy_(a_t.T)
            self.lora_B.zero_()

    def set_p(self, p: torch.Tensor) -> None:
        """Set the fixed diagonal used by the training forward (see adapters.p.build_p)."""
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (self.r_max,):
            raise ConfigError("p shape", tuple(getattr(p, "shape", ())), (self.r_max,))
        self.lora_p = p.detach().to(device=self.lora_p.device, dtype=torch.float32).clone()

    def set_inference_ranks(self, ranks: Ranks) -> None:
        """None: training forward with p. int: every token at that rank. LongTensor of shape x.shape[:-1]:
        one rank per token of the next forward's input. Ranks must lie in [0, r_max]."""
        if ranks is None:
            self.inference_ranks = None
            return
        if isinstance(ranks, torch.Tensor):
            if ranks.dtype in (torch.bool,) or ranks.is_floating_point() or ranks.is_complex():
                raise ConfigError("inference ranks dtype", str(ranks.dtype), "an integer tensor")
            if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) > self.r_max):
                bad = ranks[(ranks < 0) | (ranks > self.r_max)].unique().tolist()
                raise InvalidRankError(bad, f"0..{self.r_max}")
            self.inference_ranks = ranks.to(torch.long)
            return
        if not is_int(ranks) or not 0 <= ranks <= self.r_max:
            raise InvalidRankError(ranks, f"0..{self.r_max}")
        self.inference_ranks = ranks

    def scale(self, rank: int) -> float:
        """alpha * s_rank * c_rank: the factor of the rank-r update (as AdapterManifest.served_scale)."""
        return served_scale(rank, self.scaling, self.alpha, self.rank_scales)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        ranks = self.inference_ranks
        if ranks is None:
            h = (x.to(self.lora_A.dtype) @ self.lora_A) * self.lora_p.to(self.lora_A.dtype)
            return y + (self.alpha * (h @ self.lora_B)).to(y.dtype)
        if isinstance(ranks, int):
            return y if ranks == 0 else y + self.rank_delta(x, ranks).to(y.dtype)
        return y + self.per_token_delta(x, ranks).to(y.dtype)

    def rank_delta(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """alpha * s_r * (x @ A[:, :r]) @ B[:r]; cost O(r) per token."""
        return self.scale(rank) * ((x.to(self.lora_A.dtype) @ self.lora_A[:, :rank]) @ self.lora_B[:rank])

    def per_token_delta(self, x: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """The update of each token at its own rank: loops over the distinct ranks, not the tokens.

        for r in unique(ranks), r > 0:  out[ranks == r] = rank_delta(x[ranks == r], r)
        """
        if tuple(ranks.shape) != tuple(x.shape[:-1]):
            raise ConfigError(
                "inference ranks shape", tuple(ranks.shape), f"the input's token shape {tuple(x.shape[:-1])}"
            )
        flat_x = x.reshape(-1, self.in_features)
        flat_ranks = ranks.reshape(-1).to(x.device)
        out = torch.zeros(flat_x.shape[0], self.out_features, dtype=self.lora_B.dtype, device=x.device)
        for rank in flat_ranks.unique().tolist():
            if rank == 0:
                continue
            index = (flat_ranks == rank).nonzero().squeeze(1)
            out.index_copy_(0, index, self.rank_delta(flat_x.index_select(0, index), rank))
        return out.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def merged_delta_weight(self, rank: int) -> torch.Tensor:
        """The rank-r update in nn.Linear layout [out, in]: scale(r) * (A[:, :r] @ B[:r]).T."""
        if not is_int(rank) or not 0 <= rank <= self.r_max:
            raise InvalidRankError(rank, f"0..{self.r_max}")
        if rank == 0:
            return torch.zeros(self.out_features, self.in_features, dtype=self.lora_A.dtype, device=self.lora_A.device)
        return (self.scale(rank) * (self.lora_A[:, :rank] @ self.lora_B[:rank])).T.contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r_max={self.r_max}, "
            f"scaling={self.scaling!r}, alpha={self.alpha}"
        )
