"""Linear layers for decoding on a CPU: weight-only int8 and int4, and bfloat16 prepacked for oneDNN.

A decode step reads every weight once, so on a CPU its time is the weights' bytes over the rate its matrix-vector
kernels read them at: int8 halves bfloat16's bytes, int4 quarters them. `quantize(model, "int8")` replaces every
linear layer of a LongLlama by a `QuantizedLinear`; checkpoint.load does it as it reads, and keeps a quantized
checkpoint's own values (`QuantizedWeight`). `pack_for_cpu(model)` holds bfloat16 weights in oneDNN's own layout
(`PackedLinear`), which it reads faster than PyTorch's dense matrix-vector product does.
Nothing here is FoT: memory keys and values, and the embedding, stay in floating point.
"""

import math
import weakref
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# how a checkpoint's linear layers may be quantized, and the bytes per weight each takes, scales included
# (int4: groups of 32, a bfloat16 scale and zero point each)
QUANTIZATIONS = ("int8", "int4")
QUANTIZED_BYTES = {"int8": 1.01, "int4": 0.625}
INT4_GROUP = 64  # input channels sharing an int4 scale and zero point, where this project quantizes
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernel takes (GGUF's 4-bit blocks are 32 wide)
PACKED_ROWS = 1024  # rows of an int4 weight packed for the kernel at a time: a multiple of its 64-row blocks
# int8 layers multiply this many rows or more (a prefill) by their weight rebuilt in the compute dtype: one GEMM
# then beats the int8 kernel, made for a few rows (measured at 3B's width in bfloat16: the kernel takes 0.5 ms per
# row of 8640 x 2 by 3200; rebuilding takes 9.5 ms, and the GEMM 8 ms for 32 rows, 76 ms for 512)
DEQUANTIZE_ROWS = 32


class QuantizedWeight(NamedTuple):
    """A linear layer's weight [N, K] as a quantized checkpoint stores it (as {layer}.weight, .scales, .zeros).
    Every part is indexed by output row first, so rows are fused (q/k/v), split and reordered as a float weight's are.

    - int8: q int8 [N, K] and scales [N]: w = q * scale, one scale per output channel.
    - int4: q uint8 [N, K / 2], two 4-bit values per byte, the even column in the low nibble; scales and zeros
      [N, K / group]: w = (q - 8) * scale + zero, per group of input channels.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None

    @property
    def scheme(self) -> str:
        return "int8" if self.zeros is None else "int4"

    @property
    def shape(self) -> tuple:
        rows, columns = self.q.shape
        return rows, columns * (2 if self.zeros is not None else 1)

    @classmethod
    def cat(cls, pieces) -> "QuantizedWeight":
        """Weights of the same scheme stacked by rows (the pieces of a fused layer, or a weight's row chunks)."""
        return cls(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*pieces)))

    def map(self, fn) -> "QuantizedWeight":
        """The same weight with fn applied to each part (a row slice, a row reordering, a cast)."""
        return QuantizedWeight(*(None if part is None else fn(part) for part in self))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] the parts stand for."""
        if self.zeros is None:
            return self.q.float() * self.scales.float()[:, None]
        rows, columns = self.shape
        groups = unpack_nibbles(self.q).float().view(rows, self.scales.shape[1], -1)  # [N, K / group, group]
        return ((groups - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]).view(rows, columns)


def pack_nibbles(q):
    """[N, K] integers in [0, 15] -> uint8 [N, K / 2]: column 2j in the low nibble of byte j, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed):
    """uint8 [N, K / 2] -> int32 [N, K], the inverse of pack_nibbles."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1).int()


def int4_fits(rows: int, columns: int, group: int) -> bool:
    """Whether the int4 kernel takes a [rows, columns] weight in groups of `group`: it needs rows divisible by 16."""
    return rows % 16 == 0 and group in INT4_GROUPS and columns % group == 0


def quantize_weight(weight, scheme: str, group: int = INT4_GROUP) -> QuantizedWeight:
    """A float weight [N, K] quantized to `scheme`, round to nearest (see quantize_rows). int4 falls back to int8 for
    a weight the int4 kernel cannot take (see int4_fits)."""
    rows, columns = weight.shape
    return quantize_rows(weight, "int4" if scheme == "int4" and int4_fits(rows, columns, group) else "int8", group)


QUANTIZED_CHUNK = 1 << 22  # weights quantized at a time: a float32 chunk of 16 MB, whatever the weight's size


def quantize_rows(weight, scheme: str, group: int = INT4_GROUP) -> QuantizedWeight:
    """The rows of a float weight [N, K] quantized to `scheme` ("int8": one scale per row; "int4": a scale and zero
    point per group of `group` columns), round to nearest, whether or not the kernel takes the whole weight: every
    row is quantized on its own, so that the rows of a fused layer (q/k/v) can be quantized part by part. Scales
    and zero points are rounded to bfloat16 (what the kernels take) before the values are, so that the values are
    rounded against the scales used. A few rows at a time, so that the float32 temporaries stay small."""
    rows, columns = weight.shape
    step = max(1, QUANTIZED_CHUNK // max(columns, 1))
    chunks = [_quantize_chunk(weight[start:start + step].detach().float(), scheme, group)
              for start in range(0, rows, step)]
    return QuantizedWeight.cat(chunks)


def _quantize_chunk(w, scheme: str, group: int) -> QuantizedWeight:
    rows, columns = w.shape
    if scheme == "int4":
        groups = w.view(rows, -1, group)  # [N, K / group, group]
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)  # q = 0 stands for the group's minimum
        q = ((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
        return QuantizedWeight(pack_nibbles(q.view(rows, columns)), scale, zero)
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # [N]
    return QuantizedWeight((w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8), scale)


class QuantizedLinear(nn.Module):
    """A bias-free linear layer whose weight [N, K] is kept quantized (a QuantizedWeight) and multiplied by PyTorch's
    packed-weight kernels, as gpt-fast does. Decoding reads every weight once per token, so its speed is set by the
    weights' bytes: int8 halves bfloat16's, int4 quarters them.

    - int8 (`torch._weight_int8pack_mm`): for DEQUANTIZE_ROWS rows or more, and on a GPU, the weight is rebuilt in
      the compute dtype, in a buffer kept for it (`scratch`: the size of the largest such layer), for one ordinary
      matrix multiply instead.
    - int4 (`torch._weight_int4pack_mm_for_cpu`): the values are repacked at load into the kernel's own layout, which
      depends on the CPU's vector width, so checkpoints store the portable one. CPU only.
    Activations reach the CPU kernels in bfloat16 (in float32 they are several times slower) and leave in their own
    dtype.
    """

    def __init__(self, stored: QuantizedWeight):
        super().__init__()
        self.out_features, self.in_features = stored.shape
        self.scheme = stored.scheme
        if self.scheme == "int8":
            self.register_buffer("weight", aligned(stored.q.contiguous()))  # [N, K] int8
            self.register_buffer("scales", stored.scales.to(torch.bfloat16).contiguous())  # [N]
        else:
            self.group = self.in_features // stored.scales.shape[1]
            # the kernel's layout packs blocks of 64 rows (or fewer) on their own, so packing a few blocks at a time
            # gives the same bytes without unpacking the whole weight to int32 (8 bytes per stored byte) at once
            rows = stored.q.split(PACKED_ROWS)
            packed = torch.cat([torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(part), 1) for part in rows])
            self.register_buffer("weight", packed)  # [N, K / 2] uint8, the kernel's layout
            self.register_buffer("scales", torch.stack([stored.scales, stored.zeros], dim=-1).transpose(0, 1)
                                 .to(torch.bfloat16).contiguous())  # [K / group, N, 2]

    @classmethod
    def quantized(cls, weight, scheme: str) -> "QuantizedLinear":
        return cls(quantize_weight(weight, scheme))

    def forward(self, x):
        flat = x.reshape(-1, self.in_features)
        if self.scheme == "int8" and (not x.is_cpu or flat.shape[0] >= DEQUANTIZE_ROWS):
            weight = scratch(self.weight.shape, x.dtype, x.device).copy_(self.weight)
            out = F.linear(flat, weight.mul_(self.scales.to(x.dtype)[:, None]))
        elif self.scheme == "int8":
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.weight, self.group, self.scales)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


_SCRATCH = {}  # (dtype, device) -> the buffer int8 weights are rebuilt in, as large as the largest so far


def scratch(shape, dtype: torch.dtype, device: torch.device):
    """A buffer of this shape, reused from call to call: on this CPU a fresh buffer of a large weight's size costs
    page faults that take 8 times as long as rebuilding the weight in it (measured: 77 ms against 9.5 ms for an
    8640 x 2 by 3200 weight)."""
    numel = math.prod(shape)
    buffer = _SCRATCH.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def aligned(tensor):
    """The tensor, copied where its data does not start on a 64-byte boundary. A checkpoint's tensors are mapped from
    the file at whatever offset they sit, and the int8 kernel's vector loads crash the process on weights that are
    not 16-byte aligned."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


_PACKED = weakref.WeakValueDictionary()  # PackedLinear.key -> its packed weight, for packed_linear


def packed_linear(x: torch.Tensor, key: int) -> torch.Tensor:
    """x [..., K] times the packed weight registered under `key`. An operator of its own, that names the weight by
    a number, so that torch.compile calls it as it is: the compiler cannot trace oneDNN's opaque packed tensors."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[key], None, "none", [], "")


# Defined at the dispatcher's own level rather than by torch.library.custom_op, whose Python wrappers cost about
# 20 us a call: a third of a 576-wide product, at 120 products a SmolLM2 token
_LIBRARY = torch.library.Library("longllama", "DEF")
_LIBRARY.define("packed_linear(Tensor x, int key) -> Tensor")
_LIBRARY.impl("packed_linear", packed_linear, "CPU")


@torch.library.register_fake("longllama::packed_linear")
def _(x, key):
    return x.new_empty(*x.shape[:-1], _PACKED[key].shape[0])


class PackedLinear(nn.Module):
    """A bias-free bfloat16 linear layer whose weight is held in oneDNN's blocked layout, prepacked once at load in
    place of the dense weight (the layout inductor's freezing would give it, without a second copy). oneDNN's
    matrix-vector product reads it 1.1-3x faster than F.linear reads the dense weight on an AVX512-BF16 CPU
    (docs/performance.md), and its results are the same, bit for bit, eagerly and compiled. The state dict holds the
    dense weight, rebuilt from the packed one, so that saving and fingerprints see the same values as before."""

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # [N, K], opaque; laid out for 1 row
        self.key = id(self.packed)
        _PACKED[self.key] = self.packed

    def forward(self, x):
        return torch.ops.longllama.packed_linear(x, self.key)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed.to_dense()

    def __deepcopy__(self, memo):  # an opaque tensor cannot be copied: the copy packs the dense weight afresh
        return PackedLinear(self.packed.to_dense())


def can_pack(model: nn.Module) -> bool:
    """Whether pack_for_cpu applies: bfloat16 weights on a CPU whose oneDNN multiplies bfloat16."""
    weight = model.embed.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Hold every dense linear weight as a PackedLinear, in place, layer by layer, where can_pack says so. A tied
    lm_head stays dense: the embedding reads its rows, and packing it would hold it twice."""
    if can_pack(model):
        for name, (parent, attribute) in linear_layers(model).items():
            layer = getattr(parent, attribute)
            if type(layer) is nn.Linear and layer.weight is not model.embed.weight:
                setattr(parent, attribute, PackedLinear(layer.weight))
    return model


def named_weights(model: nn.Module, values: bool = True):
    """(name, tensor) of the model's state dict, one module's at a time: a PackedLinear's dense weight is rebuilt for
    its turn only, so that hashing the weights never holds them twice. values=False (counting bytes): it is not
    rebuilt at all, but stands as a meta tensor of its shape and dtype."""
    for prefix, module in model.named_modules():
        tensors = {}
        if isinstance(module, PackedLinear) and not values:
            tensors[f"{prefix}.weight"] = torch.empty(module.out_features, module.in_features, dtype=torch.bfloat16,
                                                      device="meta")
        else:
            module._save_to_state_dict(tensors, f"{prefix}." if prefix else "", keep_vars=False)
        yield from tensors.items()


def check_quantization(scheme: str, device: torch.device):
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {scheme!r}")
    if scheme == "int4" and device.type != "cpu":
        raise ValueError("int4 weights run on the CPU only (PyTorch's CUDA int4 kernel packs them otherwise): "
                         "use int8 on a GPU")


def linear_layers(model: nn.Module) -> dict:
    """{qualified name: (parent module, attribute)} of every linear layer: attention, MLP and lm_head."""
    return {name: (model.get_submodule(name.rpartition(".")[0]) if "." in name else model, name.rpartition(".")[2])
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, QuantizedLinear, PackedLinear))}


def quantize(model: nn.Module, scheme: str) -> nn.Module:
    """Replace every linear layer's weight by its `scheme` (int8 or int4) quantization, in place, layer by layer.
    The embedding and the norms stay as they are (a lookup reads one row of the embedding per token)."""
    check_quantization(scheme, model.embed.weight.device)
    for name, (parent, attribute) in linear_layers(model).items():
        setattr(parent, attribute, QuantizedLinear.quantized(getattr(parent, attribute).weight, scheme))
    model.config = replace(model.config, quantization=scheme)
    return model


def check_stored_weight(weight: QuantizedWeight, shape, scheme: Optional[str], where: str) -> QuantizedWeight:
    """The weight, refused unless its parts are a stored int8 or int4 weight of this [N, K] shape: int4 only where
    scheme allows it (None: either), in groups the int4 kernel takes."""
    parts = [part for part in weight if part is not None]
    rows, columns = shape
    groups = weight.scales.shape[-1] if weight.scales.dim() == 2 else 0
    if weight.scheme == "int4" and groups == 0:
        raise ValueError(f"{where} is not a stored int4 weight: its scales are {tuple(weight.scales.shape)}, not "
                         "[rows, groups]")
    if weight.scheme == "int8":
        expected = (torch.int8, (rows, columns)), (rows,)
    else:
        expected = (torch.uint8, (rows, columns // 2)), (rows, groups), (rows, groups)
    found = (parts[0].dtype, tuple(parts[0].shape)), *(tuple(part.shape) for part in parts[1:])
    if found != expected or not all(part.is_floating_point() for part in parts[1:]):
        found = ", ".join(f"{str(part.dtype).removeprefix('torch.')} {tuple(part.shape)}" for part in parts)
        raise ValueError(f"{where} is not a stored {weight.scheme} weight of shape {tuple(shape)} (found {found})")
    if weight.scheme == "int4" and scheme not in (None, "int4"):
        raise ValueError(f"{where} is stored as int4 in an {scheme} checkpoint")
    if weight.scheme == "int4" and (columns % groups or not int4_fits(rows, columns, columns // groups)):
        raise ValueError(f"{where} is stored as int4 in groups of {columns / groups:g} over {rows} rows: the int4 "
                         f"kernel takes groups of {', '.join(map(str, INT4_GROUPS))} and rows in multiples of 16")
    return weight
