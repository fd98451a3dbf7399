"""Wise-FT: exact endpoints, the midpoint, LoRA adapters, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from peft import LoraConfig, get_peft_model

from cftune.cli import main
from cftune.errors import CftuneError
from cftune.merge import MergeConfig, merge
from cftune.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    """The tiny base and a "fine-tuned" copy with every weight moved."""
    root = tmp_path_factory.mktemp("merge")
    ft = make_tiny_model(root / "ft", seed=1)  # same architecture, other weights
    return str(tiny_model), str(ft)


def _state(spec) -> dict[str, torch.Tensor]:
    return load_model(spec, device="cpu").state_dict()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_endpoints_are_the_inputs_exactly(pair, tmp_path, alpha):
    base, ft = pair
    out = merge(MergeConfig(base=base, finetuned=ft, alpha=alpha, out=str(tmp_path / "m")))
    got, want = _state(out), _state(base if alpha == 0.0 else ft)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert (out / "manifest.json").is_file() and (out / "tokenizer.json").is_file()


def test_midpoint_interpolates_every_weight(pair, tmp_path):
    base, ft = pair
    out = merge(MergeConfig(base=base, finetuned=ft, alpha=0.25, out=str(tmp_path / "m")))
    got, b, f = _state(out), _state(base), _state(ft)
    for k in got:
        torch.testing.assert_close(got[k], 0.75 * b[k] + 0.25 * f[k])


def test_lora_adapter_merge_scales_the_update(tiny_model, tmp_path):
    model = load_model(tiny_model, device="cpu")
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter has B != 0
    peft.save_pretrained(tmp_path / "adapter")
    load_tokenizer(tiny_model).save_pretrained(tmp_path / "adapter")
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model)  # --base found from it
    full = _state(tmp_path / "adapter")  # the adapter merged into its base
    base = _state(tiny_model)
    for alpha in (0.0, 0.5, 1.0):
        out = merge(MergeConfig(finetuned=str(tmp_path / "adapter"), alpha=alpha,
                                out=str(tmp_path / f"m{alpha}")))
        got = _state(out)
        for k in got:
            torch.testing.assert_close(got[k], base[k] + alpha * (full[k] - base[k]))
    assert any(not torch.equal(full[k], base[k]) for k in full)


def test_bad_inputs(pair, tmp_path, capsys):
    base, ft = pair
    with pytest.raises(CftuneError, match=r"`alpha` = 1.5 must be within \[0, 1\]"):
        MergeConfig(base=base, finetuned=ft, alpha=1.5)
    assert main(["merge", "--finetuned", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "`finetuned`:" in capsys.readouterr().err
    other = make_tiny_model(tmp_path / "other", bos=False)  # another vocabulary size
    with pytest.raises(CftuneError, match="tensor model.embed_tokens.weight"):
        merge(MergeConfig(base=str(other), finetuned=ft, alpha=0.5, out=str(tmp_path / "x")))
    with pytest.raises(CftuneError, match="cannot tell its base model; pass --base"):
        merge(MergeConfig(finetuned=ft, alpha=0.5, out=str(tmp_path / "y")))


def test_cli_merge_of_a_trained_run_finds_its_base(pair, tmp_path):
    base, ft = pair
    (tmp_path / "run").mkdir()
    load_model(ft, device="cpu").save_pretrained(tmp_path / "run")
    load_tokenizer(ft).save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"model": base}))
    assert main(["merge", "--finetuned", str(tmp_path / "run"), "--alpha", "0",
                 "--out", str(tmp_path / "m")]) == 0
    got, want = _state(tmp_path / "m"), _state(base)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_tied_embeddings_survive_training_merge_and_reload(tiny_model_tied, tmp_path):
    """The embedded default ties its input embedding to the output layer: training, Wise-FT,
    LoRA merge and save/load must keep them one tensor, moved once (not twice, not untied)."""
    from test_train import ROWS

    from cftune.train.config import TrainConfig
    from cftune.train.stage import train

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:16]))
    common = dict(model=str(tiny_model_tied), task=str(task), prompt_field="question",
                  response_field="answer", max_steps=2, batch_size=4, learning_rate=1e-2,
                  dtype="fp32", warmup=0.0, device="cpu")
    full = train(TrainConfig(out=str(tmp_path / "full"), method="full", **common))
    lora = train(TrainConfig(out=str(tmp_path / "lora"), method="lora", lora_rank=2,
                             lora_merge=True, lora_targets=["q_proj", "v_proj"], **common))
    for spec in (tiny_model_tied, full, lora, lora / "merged"):
        m = load_model(spec, device="cpu")
        assert m.config.tie_word_embeddings
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), spec
    base_w, ft_w = (load_model(s, device="cpu").lm_head.weight for s in (tiny_model_tied, full))
    assert not torch.equal(base_w, ft_w)  # training moved the tied matrix
    out = merge(MergeConfig(base=str(tiny_model_tied), finetuned=str(full), alpha=0.5,
                            out=str(tmp_path / "wise")))
    wise = load_model(out, device="cpu")
    assert wise.lm_head.weight.data_ptr() == wise.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(wise.lm_head.weight, 0.5 * base_w + 0.5 * ft_w)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the LoRA run's adapter and its merged copy are one model
        torch.testing.assert_close(load_model(lora, device="cpu")(input_ids=ids).logits,
                                   load_model(lora / "merged", device="cpu")(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
