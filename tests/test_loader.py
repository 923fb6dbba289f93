"""Loading every family into stock transformers classes, bidirectionally."""

from __future__ import annotations

import json

import pytest
import torch

from model.network.families import FAMILIES, LLADA, detect_family, get_family
from model.network.loader import ModelLoadError, load_model, resolve_model_path
from model.network.tiny import _olmo_names

from .conftest import FAMILY_NAMES


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_is_detected_from_config(tiny_dirs, name):
    raw = json.loads((tiny_dirs[name] / "config.json").read_text())
    assert detect_family(raw).name == name


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_attention_is_bidirectional(tiny_models, name):
    """Changing a suffix token changes the logits at the first hole position."""
    model = tiny_models[name]
    ids = torch.tensor([[model.ids.bos or 0, 10, 11, model.ids.mask, model.ids.mask, 12, 13]])
    changed = ids.clone()
    changed[0, -1] = 14
    with torch.no_grad():
        before = model.network(ids).logits[0, 3]
        after = model.network(changed).logits[0, 3]
    assert (before - after).abs().max() > 1e-4


def test_dream_logits_are_shifted_and_others_not(tiny_models):
    assert tiny_models["dream"].family.shifted_logits
    assert not tiny_models["llada"].family.shifted_logits
    assert not tiny_models["default"].family.shifted_logits


def test_llada_rename_covers_every_weight(tiny_dirs):
    """The OLMo-style names map one to one onto LlamaForCausalLM (strict load succeeded)."""
    model = load_model(tiny_dirs["llada"], device="cpu")
    expected = set(model.network.state_dict())
    renamed = {LLADA.rename_weight(k) for k in _olmo_names(model.network.state_dict())}
    assert renamed == expected


def test_llada_weights_survive_the_rename(tiny_dirs):
    from safetensors.torch import load_file

    model = load_model(tiny_dirs["llada"], device="cpu")
    raw = load_file(str(tiny_dirs["llada"] / "model.safetensors"))
    wte = raw["model.transformer.wte.weight"]
    assert torch.equal(model.network.model.embed_tokens.weight, wte)


def test_unknown_family_names_the_known_ones():
    known = ("default, diffucoder, dream, dreamon, fast-dllm-v2, llada, open-dcoder, "
             "stable-diffcoder")
    with pytest.raises(ValueError, match=known):
        get_family("gpt")
    assert set(FAMILIES) == set(known.split(", "))


def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_broken_weights_give_one_clear_error(tiny_dirs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["default"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(broken)


def test_weights_of_another_family_are_refused(tiny_dirs, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_dirs["default"], mixed)
    shutil.copy(tiny_dirs["llada"] / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(mixed)


def test_hf_cache_snapshot_is_found_offline(tiny_dirs, tmp_path, monkeypatch):
    import shutil

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_dirs["dream"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("org/tiny") == snapshot
    assert load_model("org/tiny", device="cpu").family.name == "dream"


def test_dtype_and_device_default_to_fp32_on_cpu(tiny_model):
    assert tiny_model.dtype == torch.float32
    assert tiny_model.device.type == "cpu"
    assert next(tiny_model.network.parameters()).dtype == torch.float32


def test_dtype_override(tiny_dirs):
    model = load_model(tiny_dirs["default"], device="cpu", dtype="bfloat16")
    assert next(model.network.parameters()).dtype == torch.bfloat16


def test_a_broken_tokenizer_gives_one_clear_error(tiny_dirs, tmp_path):
    import shutil

    broken = tmp_path / "bad-tokenizer"
    shutil.copytree(tiny_dirs["default"], broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelLoadError, match="cannot read the tokenizer"):
        load_model(broken)


def test_weights_of_the_wrong_shape_name_the_first_tensor_in_one_line(tiny_dirs, tmp_path):
    import shutil

    wrong = tmp_path / "wrong-shape"
    shutil.copytree(tiny_dirs["default"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["hidden_size"] *= 2
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"do not fit config.json: [\w.]+"
                                             r"\.weight is \[\d+, \d+\] in the checkpoint but "
                                             r"\[\d+, \d+\]") as error:
        load_model(wrong)
    assert "\n" not in str(error.value) and "more tensors" in str(error.value)
