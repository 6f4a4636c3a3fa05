"""Slot-batched streaming SEANet encoder/decoder and Mimi's 25 Hz <-> 12.5 Hz resamplers.

Each session owns one row ("slot") of preallocated state tensors, so any subset of sessions can be
stepped together in one batched call: a step gathers the rows of the given slots, runs the plain
convolution on ``[state | x]`` and scatters the new rows back. The module tree, and hence the
``state_dict`` keys, is the one of kyutai's ``moshi`` package, so its checkpoints load with
``strict=True``; the state tensors are non-persistent buffers and never appear in ``state_dict``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kernels import conv as conv_kernels
from kernels import linear as linear_kernels

from .config import SeanetConfig


def _holder(name: str, module: nn.Module) -> nn.Module:
    # The reference nests every conv one level deeper (its norm wrapper); an empty container with
    # the same attribute name reproduces the key path without adding behaviour.
    wrapper = nn.Module()
    setattr(wrapper, name, module)
    return wrapper


def _dense_gemm(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The CPU path's dense matrix of a conv's weight (`module.gemm_weight()`), built the first time
    a product does not run on the prepacked copy and kept until the weight changes (loading bumps
    its version)."""
    key = (weight.data_ptr(), weight._version, weight.dtype)
    if getattr(module, "_dense_key", None) != key:
        module._dense_matrix, module._dense_key = module.gemm_weight(), key
    return module._dense_matrix


class StreamingConv1d(nn.Module):
    """Causal Conv1d; `previous` holds the last ``effective_kernel - stride`` input samples per slot."""

    kernel_backend = "torch"  # set by kernels.dispatch.apply_backend
    packed: linear_kernels.Packed | None = None  # set by kernels.linear.prepack

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, pad_mode: str = "constant"):
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
        self.pad_mode = pad_mode
        self.conv = _holder("conv", nn.Conv1d(in_channels, out_channels, kernel_size, stride,
                                              dilation=dilation, groups=groups, bias=bias))
        self.stride = stride
        self.context = (kernel_size - 1) * dilation + 1 - stride
        if self.context < 0:
            raise ValueError("StreamingConv1d needs stride <= effective kernel size")
        self.previous: torch.Tensor | None
        self.first: torch.Tensor | None
        self.register_buffer("previous", None, persistent=False)
        self.register_buffer("first", None, persistent=False)

    def alloc_state(self, max_sessions: int) -> None:
        w = self.conv.conv.weight
        self.previous = conv_kernels.alloc_state(max_sessions, self.conv.conv.in_channels, self.context,
                                                 w.dtype, w.device, self.kernel_backend)
        self.first = torch.ones(max_sessions, dtype=torch.bool, device=w.device)

    def reset_rows(self, slots: torch.Tensor) -> None:
        self.previous.index_fill_(0, slots, 0.0)
        self.first.index_fill_(0, slots, True)

    def step(self, x: torch.Tensor, slots: torch.Tensor, act: str | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
        """One step for `slots`; `act="elu"` applies the preceding ELU inside the conv, `residual`
        is added to the output."""
        if x.shape[-1] % self.stride:
            raise ValueError(f"step length {x.shape[-1]} is not a multiple of the stride {self.stride}")
        if self.previous is None:
            raise RuntimeError("streaming state not allocated: call init_state(max_sessions) first")
        c = self.conv.conv
        first = self.first if self.pad_mode == "replicate" else None
        return conv_kernels.conv1d_step(x, c.weight, c.bias, self.previous, slots, self.stride, c.dilation[0],
                                        c.groups, first, act, self.kernel_backend, self.packed, residual,
                                        self.dense_gemm)

    def dense_gemm(self) -> torch.Tensor:
        return _dense_gemm(self, self.conv.conv.weight)

    def gemm_weight(self) -> torch.Tensor | None:
        c = self.conv.conv
        return conv_kernels.gemm_weight(c.weight, False, c.groups, c.dilation[0], self.stride)


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d; `partial` holds the ``kernel - stride`` overlap-add tail per slot."""

    kernel_backend = "torch"  # set by kernels.dispatch.apply_backend
    packed: linear_kernels.Packed | None = None  # set by kernels.linear.prepack

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        self.convtr = _holder("convtr", nn.ConvTranspose1d(in_channels, out_channels, kernel_size,
                                                           stride, groups=groups, bias=bias))
        self.overlap = kernel_size - stride
        if self.overlap < 0:
            raise ValueError("StreamingConvTranspose1d needs stride <= kernel size")
        self.partial: torch.Tensor | None
        self.register_buffer("partial", None, persistent=False)

    def alloc_state(self, max_sessions: int) -> None:
        w = self.convtr.convtr.weight
        self.partial = conv_kernels.alloc_state(max_sessions, self.convtr.convtr.out_channels, self.overlap,
                                                w.dtype, w.device, self.kernel_backend)

    def reset_rows(self, slots: torch.Tensor) -> None:
        self.partial.index_fill_(0, slots, 0.0)

    def step(self, x: torch.Tensor, slots: torch.Tensor, act: str | None = None) -> torch.Tensor:
        """One step for `slots`; `act="elu"` applies the preceding ELU inside the conv."""
        if self.partial is None:
            raise RuntimeError("streaming state not allocated: call init_state(max_sessions) first")
        c = self.convtr.convtr
        return conv_kernels.conv_transpose1d_step(x, c.weight, c.bias, self.partial, slots, c.stride[0], c.groups,
                                                  act, self.kernel_backend, self.packed, self.dense_gemm)

    def dense_gemm(self) -> torch.Tensor:
        return _dense_gemm(self, self.convtr.convtr.weight)

    def gemm_weight(self) -> torch.Tensor | None:
        c = self.convtr.convtr
        return conv_kernels.gemm_weight(c.weight, True, c.groups, 1, c.stride[0])


_STATEFUL = (StreamingConv1d, StreamingConvTranspose1d)


def _fuses_elu(elu: nn.Module, nxt: nn.Module | None) -> bool:
    return isinstance(elu, nn.ELU) and elu.alpha == 1.0 and isinstance(nxt, _STATEFUL)


def _run(layers: nn.Sequential, x: torch.Tensor, slots: torch.Tensor,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """Steps `layers` in order, each ELU taken into the conv after it; `residual` is added to the
    output, inside the last conv when that is a StreamingConv1d."""
    mods = list(layers)
    i = 0
    while i < len(mods):
        fused = _fuses_elu(mods[i], mods[i + 1] if i + 1 < len(mods) else None)
        layer = mods[i + 1] if fused else mods[i]
        i += 2 if fused else 1
        kwargs = {"act": "elu"} if fused else {}
        if i == len(mods) and residual is not None and isinstance(layer, StreamingConv1d):
            kwargs["residual"], residual = residual, None
        x = layer.step(x, slots, **kwargs) if hasattr(layer, "step") else layer(x)
    return x if residual is None else x + residual


class SeanetResBlock(nn.Module):
    def __init__(self, dim: int, kernel_sizes: Sequence[int], dilations: Sequence[int],
                 pad_mode: str, compress: int, true_skip: bool):
        super().__init__()
        hidden = dim // compress
        layers: list[nn.Module] = []
        last = len(kernel_sizes) - 1
        for i, (k, d) in enumerate(zip(kernel_sizes, dilations)):
            layers += [nn.ELU(alpha=1.0),
                       StreamingConv1d(dim if i == 0 else hidden, dim if i == last else hidden, k,
                                       dilation=d, pad_mode=pad_mode)]
        self.block = nn.Sequential(*layers)
        self.shortcut = nn.Identity() if true_skip else StreamingConv1d(dim, dim, 1, pad_mode=pad_mode)

    def step(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        skip = self.shortcut.step(x, slots) if isinstance(self.shortcut, StreamingConv1d) else x
        return _run(self.block, x, slots, residual=skip)


class SlotStreaming(nn.Module):
    """Owner of the per-slot state of every stateful layer below it."""

    max_sessions: int = 0

    def init_state(self, max_sessions: int) -> None:
        """(Re)allocates zeroed state for `max_sessions` slots, on the weights' device and dtype."""
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        for m in self.modules():
            if isinstance(m, _STATEFUL):
                m.alloc_state(max_sessions)
        self.max_sessions = max_sessions

    def _slots(self, slots) -> torch.Tensor:
        if not self.max_sessions:
            raise RuntimeError("streaming state not allocated: call init_state(max_sessions) first")
        return torch.as_tensor(slots, dtype=torch.long, device=next(self.parameters()).device)

    def reset(self, slots) -> None:
        """Returns the given slots to the state of a fresh stream; other slots are untouched."""
        idx = self._slots(slots)
        for m in self.modules():
            if isinstance(m, _STATEFUL):
                m.reset_rows(idx)


class SeanetEncoder(SlotStreaming):
    """Waveform [B, channels, T] -> latents [B, dimension, T / hop_length]."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        self.cfg = cfg
        self.hop_length = cfg.hop_length
        mult = 1
        nf = cfg.n_filters
        model: list[nn.Module] = [StreamingConv1d(cfg.channels, nf, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        for ratio in reversed(cfg.ratios):
            for j in range(cfg.n_residual_layers):
                model.append(SeanetResBlock(mult * nf, [cfg.residual_kernel_size, 1], [cfg.dilation_base ** j, 1],
                                            cfg.pad_mode, cfg.compress, cfg.true_skip))
            model += [nn.ELU(alpha=1.0),
                      StreamingConv1d(mult * nf, mult * nf * 2, 2 * ratio, stride=ratio, pad_mode=cfg.pad_mode)]
            mult *= 2
        model += [nn.ELU(alpha=1.0),
                  StreamingConv1d(mult * nf, cfg.dimension, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        self.model = nn.Sequential(*model)

    def step(self, x: torch.Tensor, slots) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] % self.hop_length:
            raise ValueError(f"encoder input must be [B, C, T] with T a multiple of {self.hop_length}, "
                             f"got {tuple(x.shape)}")
        return _run(self.model, x, self._slots(slots))


class SeanetDecoder(SlotStreaming):
    """Latents [B, dimension, t] -> waveform [B, channels, t * hop_length]."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        self.cfg = cfg
        self.hop_length = cfg.hop_length
        nf = cfg.n_filters
        mult = 2 ** len(cfg.ratios)
        model: list[nn.Module] = [StreamingConv1d(cfg.dimension, mult * nf, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        for ratio in cfg.ratios:
            model += [nn.ELU(alpha=1.0),
                      StreamingConvTranspose1d(mult * nf, mult * nf // 2, 2 * ratio, stride=ratio)]
            for j in range(cfg.n_residual_layers):
                model.append(SeanetResBlock(mult * nf // 2, [cfg.residual_kernel_size, 1],
                                            [cfg.dilation_base ** j, 1], cfg.pad_mode, cfg.compress,
                                            cfg.true_skip))
            mult //= 2
        model += [nn.ELU(alpha=1.0),
                  StreamingConv1d(nf, cfg.channels, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        self.model = nn.Sequential(*model)

    def step(self, z: torch.Tensor, slots) -> torch.Tensor:
        if z.dim() != 3:
            raise ValueError(f"decoder input must be [B, dimension, t], got {tuple(z.shape)}")
        return _run(self.model, z, self._slots(slots))


class ConvDownsample(SlotStreaming):
    """Learnt strided conv from the encoder rate to the frame rate (Mimi: 25 Hz -> 12.5 Hz)."""

    def __init__(self, stride: int, dimension: int):
        super().__init__()
        self.stride = stride
        self.conv = StreamingConv1d(dimension, dimension, 2 * stride, stride=stride, bias=False,
                                    pad_mode="replicate")

    def step(self, x: torch.Tensor, slots) -> torch.Tensor:
        return self.conv.step(x, self._slots(slots))


class ConvTrUpsample(SlotStreaming):
    """Learnt channel-wise transposed conv from the frame rate back to the decoder rate.

    Channel-wise (groups = dimension) is what Mimi checkpoints were trained with
    (``upsample_channel_wise_bug=True`` in the reference).
    """

    def __init__(self, stride: int, dimension: int):
        super().__init__()
        self.stride = stride
        self.convtr = StreamingConvTranspose1d(dimension, dimension, 2 * stride, stride=stride,
                                               groups=dimension, bias=False)

    def step(self, x: torch.Tensor, slots) -> torch.Tensor:
        return self.convtr.step(x, self._slots(slots))
