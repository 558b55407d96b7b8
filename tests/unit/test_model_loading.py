"""Strict checkpoint loading: every malformed checkpoint fails with a ModelLoadError naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from epdserve.errors import ModelLoadError
from epdserve.models.checkpoint import model_revision
from epdserve.models.loader import load_decoder, load_vision_encoder
from epdserve.models.spec import load_spec

pytestmark = pytest.mark.unit


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def _edit_weights(ckpt, edit):
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_unknown_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_spec(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_spec(tmp_path)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_decoder(ckpt, device="cpu")


def test_pickle_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_decoder(ckpt, device="cpu")


def test_missing_tensor_is_named(ckpt):
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    _edit_weights(ckpt, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        load_decoder(ckpt, device="cpu")


def test_unexpected_tensor_is_named(ckpt):
    _edit_weights(ckpt, lambda t: t.__setitem__("language_model.model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'layers\.0\.extra\.weight'"):
        load_decoder(ckpt, device="cpu")


def test_tensor_outside_known_components_is_named(ckpt):
    _edit_weights(ckpt, lambda t: t.__setitem__("mystery.weight", torch.zeros(2)))
    with pytest.raises(ModelLoadError, match="unexpected tensor 'mystery.weight'"):
        load_decoder(ckpt, device="cpu")


def test_wrong_shape_is_named(ckpt):
    name = "language_model.model.norm.weight"
    _edit_weights(ckpt, lambda t: t.__setitem__(name, torch.ones(3)))
    with pytest.raises(ModelLoadError, match=r"'norm\.weight' has shape \(3,\)"):
        load_decoder(ckpt, device="cpu")


def test_vision_tensor_missing_is_named(ckpt):
    _edit_weights(ckpt, lambda t: t.pop("multi_modal_projector.linear_2.weight"))
    with pytest.raises(ModelLoadError, match="projector: missing tensor 'linear_2.weight'"):
        load_vision_encoder(ckpt, device="cpu")


def test_truncated_weights_file(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:4])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_decoder(ckpt, device="cpu")


def test_corrupt_weights_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_decoder(ckpt, device="cpu")


def test_non_llava_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config["text_config"] | {"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="'llava'"):
        load_spec(ckpt)


def test_unsupported_rope_type_is_refused(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="rope_type 'dynamic'"):
        load_spec(ckpt)


def test_fused_moe_layout_loads_to_the_same_model(tiny_checkpoint_factory, tmp_path):
    """Newer transformers layouts fuse Mixtral experts into 3-D tensors; both layouts load identically."""
    original = tiny_checkpoint_factory("mixtral", "clip", 4)
    fused = shutil.copytree(original, tmp_path / "fused")
    tensors = load_file(fused / "model.safetensors")
    spec = load_spec(original).decoder
    for layer in range(spec.num_layers):
        base = f"language_model.model.layers.{layer}.block_sparse_moe"
        experts = range(spec.moe.num_experts)
        gate = torch.stack([tensors.pop(f"{base}.experts.{e}.w1.weight") for e in experts])
        up = torch.stack([tensors.pop(f"{base}.experts.{e}.w3.weight") for e in experts])
        down = torch.stack([tensors.pop(f"{base}.experts.{e}.w2.weight") for e in experts])
        new = f"language_model.model.layers.{layer}.mlp"
        tensors[f"{new}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        tensors[f"{new}.experts.down_proj"] = down.contiguous()
        tensors[f"{new}.gate.weight"] = tensors.pop(f"{base}.gate.weight")
    save_file(tensors, fused / "model.safetensors")
    a, b = load_decoder(original, device="cpu"), load_decoder(fused, device="cpu")
    for (name, pa), (_, pb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert torch.equal(pa, pb), name


def test_revision_tracks_weights_and_is_stable(tiny_checkpoint, ckpt):
    assert model_revision(tiny_checkpoint) == model_revision(ckpt)
    _edit_weights(ckpt, lambda t: t["language_model.model.norm.weight"].mul_(2))
    assert model_revision(tiny_checkpoint) != model_revision(ckpt)


def test_transformers_loads_the_tiny_checkpoint(tiny_checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert model.config.model_type == "llava"
    assert processor.tokenizer.chat_template
