"""Reading a LLaVA checkpoint directory: weight files, tensor names, strict loading, revision.

Only safetensors are read (never pickle / torch.load). Tensor names from the two
layouts `transformers` has used (`language_model.model.*` and `model.language_model.*`)
are normalised to module-local names per component; checkpoint quirks (fused MoE experts,
`vision_model.` prefixes) are handled here, in load hooks, never in a forward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from epdserve.errors import ModelLoadError

# (checkpoint prefix, component, local prefix); first match wins.
_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("language_model.model.", "decoder", ""),
    ("model.language_model.", "decoder", ""),
    ("language_model.lm_head.", "decoder", "lm_head."),
    ("lm_head.", "decoder", "lm_head."),
    ("vision_tower.", "vision", ""),
    ("model.vision_tower.", "vision", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.multi_modal_projector.", "projector", ""),
)


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    file: pathlib.Path
    name: str           # name inside the file
    dtype: str          # safetensors dtype code, e.g. "F32", "BF16"


class Checkpoint:
    """Index of a checkpoint's tensors by component ("decoder" | "vision" | "projector")."""

    def __init__(self, model_dir: str | pathlib.Path) -> None:
        self.model_dir = pathlib.Path(model_dir)
        self.files = weight_files(self.model_dir)
        self.components: dict[str, dict[str, TensorLocation]] = {"decoder": {}, "vision": {}, "projector": {}}
        for file in self.files:
            for name, entry in _header_entries(file).items():
                self._index(file, name, entry.get("dtype", ""))

    def _index(self, file: pathlib.Path, name: str, dtype: str) -> None:
        for prefix, component, local_prefix in _PREFIXES:
            if name.startswith(prefix):
                self.components[component][local_prefix + name[len(prefix):]] = TensorLocation(file, name, dtype)
                return
        raise ModelLoadError(f"unexpected tensor {name!r} in {file.name}")

    def read(self, component: str) -> dict[str, torch.Tensor]:
        """All tensors of one component, by local name, on CPU in their stored dtype."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[pathlib.Path, list[tuple[str, str]]] = {}
        for local, loc in self.components[component].items():
            by_file.setdefault(loc.file, []).append((local, loc.name))
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for local, name in names:
                    out[local] = f.get_tensor(name)
        return out

    def stored_dtype(self) -> torch.dtype:
        """The dtype the decoder's embedding is stored in (read from the header, not the data)."""
        loc = self.components["decoder"].get("embed_tokens.weight")
        if loc is None:
            raise ModelLoadError(f"{self.model_dir}: missing tensor 'embed_tokens.weight' (decoder)")
        if loc.dtype not in _SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{self.model_dir}: embed_tokens.weight has unsupported dtype {loc.dtype!r}")
        return _SAFETENSORS_DTYPES[loc.dtype]


def weight_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir} is missing weight shards {missing}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")):
        raise ModelLoadError(f"{model_dir} has only .bin weights; epdserve loads safetensors only (no pickle)")
    raise ModelLoadError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _header_entries(file: pathlib.Path) -> dict[str, dict]:
    try:
        header = json.loads(_safetensors_header(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file.name} has a corrupt safetensors header") from exc
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _safetensors_header(file: pathlib.Path) -> bytes:
    with open(file, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ModelLoadError(f"{file.name} is truncated (no safetensors header)")
        size = int.from_bytes(size_bytes, "little")
        header = f.read(size)
        if len(header) != size:
            raise ModelLoadError(f"{file.name} is truncated (safetensors header)")
        return header


def load_strict(
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    what: str,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    optional: Iterable[str] = (),
) -> None:
    """Load `tensors` into `module` by name: a missing, unexpected or mis-shaped tensor raises
    ModelLoadError naming it. Names in `optional` may be absent (they keep their current value)."""
    expected = module.state_dict()
    optional = set(optional)
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ModelLoadError(f"{what}: missing tensor {missing[0]!r}" + _more(missing))
    if unexpected:
        raise ModelLoadError(f"{what}: unexpected tensor {unexpected[0]!r}" + _more(unexpected))
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"{what}: tensor {name!r} has shape {tuple(tensor.shape)}, config expects {tuple(expected[name].shape)}"
            )
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=False, assign=True)


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


# ---- load hooks: checkpoint layouts -> our module names -------------------------------------------

_FUSED_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_FUSED_ROUTER = re.compile(r"^layers\.(\d+)\.mlp\.gate\.weight$")


def unfuse_moe_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Newer `transformers` layouts store Mixtral experts as 3-D `gate_up_proj` [E, 2I, d] and
    `down_proj` [E, d, I]; split them into per-expert w1 (gate), w3 (up), w2 (down)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        fused, router = _FUSED_EXPERTS.match(name), _FUSED_ROUTER.match(name)
        if router:
            out[f"layers.{router.group(1)}.block_sparse_moe.gate.weight"] = t
        elif fused and fused.group(2) == "gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"layers.{fused.group(1)}.block_sparse_moe.experts.{e}.w1.weight"] = gate[e]
                out[f"layers.{fused.group(1)}.block_sparse_moe.experts.{e}.w3.weight"] = up[e]
        elif fused:
            for e in range(t.shape[0]):
                out[f"layers.{fused.group(1)}.block_sparse_moe.experts.{e}.w2.weight"] = t[e]
        else:
            out[name] = t
    return out


def align_prefix(tensors: dict[str, torch.Tensor], expected: Iterable[str], prefix: str) -> dict[str, torch.Tensor]:
    """Add or strip `prefix` (e.g. "vision_model.") so the checkpoint names match the module's."""
    expected = set(expected)
    have_prefix = all(k.startswith(prefix) for k in tensors)
    want_prefix = all(k.startswith(prefix) for k in expected)
    if have_prefix and not want_prefix:
        return {k[len(prefix):]: v for k, v in tensors.items()}
    if want_prefix and not have_prefix:
        return {prefix + k: v for k, v in tensors.items()}
    return tensors


LoadHook = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


# ---- revision ----------------------------------------------------------------------------------------

_SAMPLES_PER_FILE = 16
_SAMPLE_BYTES = 1 << 16


def model_revision(model_dir: str | pathlib.Path) -> str:
    """A content fingerprint of the checkpoint, stable across processes and cheap to compute:
    SHA-256 over config.json, each weight file's safetensors header and size, and 16 evenly
    spaced 64 KiB samples of its data. Two checkpoints with equal config but different weights differ."""
    model_dir = pathlib.Path(model_dir)
    h = hashlib.sha256(b"epdserve-revision-v1\0")
    h.update((model_dir / "config.json").read_bytes())
    for file in weight_files(model_dir):
        size = file.stat().st_size
        h.update(file.name.encode() + b"\0" + str(size).encode() + b"\0")
        h.update(_safetensors_header(file))
        with open(file, "rb") as f:
            for i in range(_SAMPLES_PER_FILE):
                f.seek(size * i // _SAMPLES_PER_FILE)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]
