"""`dtype: auto` (cftune.precision): the faster of fp32 and bf16 on this machine, measured once,
cached, and recorded in the training manifest."""

from __future__ import annotations

import json

import pytest
import torch

from cftune import precision


def test_measurement_picks_the_faster_precision():
    m = precision.measure_cpu()
    assert m["fp32_gflops"] > 0 and m["bf16_gflops"] > 0
    assert m["dtype"] == ("bf16" if m["bf16_gflops"] > 1.1 * m["fp32_gflops"] else "fp32")
    assert m["machine"] == precision.machine_key()


def test_choice_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path))
    first = precision.cpu_choice()
    cached = json.loads((tmp_path / precision.CACHE_FILE).read_text())
    assert cached[precision.machine_key()] == first

    def no_second_measurement():
        raise AssertionError("measured again despite the cache")
    monkeypatch.setattr(precision, "measure_cpu", no_second_measurement)
    assert precision.cpu_choice() == first
    assert precision.resolve("auto", torch.device("cpu"))[0] == first["dtype"]
    assert precision.resolve("fp32", torch.device("cpu")) == ("fp32", {"dtype": "fp32",
                                                                      "chosen": "as set"})
    (tmp_path / precision.CACHE_FILE).write_text("{damaged")
    monkeypatch.undo()
    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path))
    assert precision.cpu_choice()["dtype"] in ("fp32", "bf16")  # re-measured, not an error


def test_training_with_auto_records_the_choice(tiny_model, tmp_path, monkeypatch):
    from cftune.train.config import TrainConfig
    from cftune.train.stage import train

    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    out = train(TrainConfig(model=str(tiny_model), task="builtin:arithmetic", task_rows=8, method="full",
                            prompt_field="question", response_field="answer",
                            max_steps=1, batch_size=2, device="cpu", out=str(tmp_path / "run")))
    facts = json.loads((out / "manifest.json").read_text())["precision"]
    assert facts["chosen"].startswith("auto") and facts == {**precision.cpu_choice(),
                                                            "chosen": facts["chosen"]}
    args = json.loads((out / "training_args.json").read_text())
    assert args["bf16"] == (facts["dtype"] == "bf16")


@pytest.mark.parametrize("bad", ["bf32", "AUTO"])
def test_unknown_dtype_is_refused(bad):
    from cftune.errors import CftuneError
    from cftune.train.config import TrainConfig

    with pytest.raises(CftuneError, match=f"`dtype` = '{bad}' is not one of fp32, bf16, fp16, auto"):
        TrainConfig(model="x", task="builtin:arithmetic", dtype=bad)


def _machine_prefers(monkeypatch, dtype: str) -> None:
    monkeypatch.setattr(precision, "cpu_choice", lambda cache=None: {
        "dtype": dtype, "fp32_gflops": 1.0, "bf16_gflops": 1.0, "machine": "test"})


def test_sampling_with_auto_keeps_the_folder_precision(tiny_model, tmp_path, monkeypatch):
    """`cftune generate --dtype auto` samples in the machine's choice and records it; extending
    the folder on a machine that prefers another precision keeps the first one, so `logp_base`
    and the samples' law never change within one pool."""
    from cftune.generate.config import GenerateConfig
    from cftune.generate.stage import generate
    from cftune.io import read_manifest

    def run(n: int) -> dict:
        generate(GenerateConfig(model=str(tiny_model), out=str(tmp_path / "cf"), num_samples=n,
                                max_new_tokens=6, batch_size=2, device="cpu", seed=3))
        return read_manifest(tmp_path / "cf")

    _machine_prefers(monkeypatch, "bf16")
    first = run(2)
    assert first["logp_dtype"] == "bf16" and first["precision"]["dtype"] == "bf16"
    assert first["settings"]["dtype"] == "auto"
    _machine_prefers(monkeypatch, "fp32")
    extended = run(4)
    assert extended["counts"]["samples"] == 4 and extended["logp_dtype"] == "bf16"
    assert extended["precision"]["chosen"] == "auto: the folder's first samples"
    fresh = GenerateConfig(model=str(tiny_model), out=str(tmp_path / "cf2"), num_samples=2,
                           max_new_tokens=6, batch_size=2, device="cpu", seed=3)
    assert read_manifest(generate(fresh))["logp_dtype"] == "fp32"


def test_greedy_decoding_accepts_auto_and_scoring_does_not():
    from cftune.errors import CftuneError
    from cftune.evaluate.stage import EvalConfig

    EvalConfig(model=["x"], task="t.jsonl", decode_dtype="auto")
    with pytest.raises(CftuneError, match="score_dtype must be one of fp32, bf16, fp16 "):
        EvalConfig(model=["x"], task="t.jsonl", score_dtype="auto")
