"""`cftune eval` end to end on tiny models: the table, eval.json / eval.md, the base cache, and
the one-line error for a model whose vocabulary differs from the base's."""

from __future__ import annotations

import json

import pytest
from test_eval_kl import ancestral, perturb, write_sample_folder

from cftune.cli import main
from cftune.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    base = load_model(str(tiny_model), device="cpu")
    tok = load_tokenizer(str(tiny_model))
    prefix = [tok.bos_token_id]
    records = ancestral(base, prefix, tok.eos_token_id, n=16, max_new=16, seed=0)
    samples = write_sample_folder(tmp / "cfs", base, str(tiny_model), records, prefix, tok)
    bench = tmp / "bench.jsonl"
    bench.write_text("".join(json.dumps({"context": f"Q{i}: pick\nA:", "choices": ["x", "yy", "z"],
                                         "gold": i % 3}) + "\n" for i in range(6)))
    task = tmp / "task.jsonl"
    task.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))
    text = tmp / "text.txt"
    text.write_text("Some text to score for perplexity.\n")
    return {"base": str(tiny_model), "perturbed": str(perturb(tiny_model, tmp / "perturbed")),
            "samples": str(samples), "bench": str(bench), "task": str(task), "text": str(text)}


def test_eval_end_to_end_and_cache(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "evals"
    argv = ["eval", "--base", setup["base"], "--model", setup["perturbed"],
            "--kl-samples", setup["samples"], "--bench", setup["bench"], "--task", setup["task"],
            "--perplexity", setup["text"], "--limit", "4", "--max-new-tokens", "4",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bench/bench" in printed and "Δ vs base" in printed and "kl_per_token" in printed
    report = json.loads((out / "eval.json").read_text())
    assert (out / "eval.md").read_text().startswith("# cftune eval")
    assert report["base"] == setup["base"] and [m["role"] for m in report["models"]] == ["base", "model"]
    assert {"torch", "transformers", "cftune"} <= set(report["versions"])
    rows = {(e["model"], e["metric"]): e for e in report["results"]}
    kl_base, kl_model = rows[(setup["base"], "kl")], rows[(setup["perturbed"], "kl")]
    assert abs(kl_base["value"]) < 1e-4 and kl_model["value"] > 0 and kl_model["n"] == 16
    acc = rows[(setup["perturbed"], "bench/bench")]
    assert acc["n"] == 4 and acc["delta"] == pytest.approx(
        acc["value"] - rows[(setup["base"], "bench/bench")]["value"])
    assert acc["compared_to"] == setup["base"] and len(acc["delta_ci95"]) == 2
    assert rows[(setup["base"], "task_acc")]["n"] == 3
    nll = rows[(setup["perturbed"], "task_nll")]
    assert nll["n"] == 3 and nll["value"] > 0 and not nll["higher_is_better"]
    assert rows[(setup["base"], "perplexity/text")]["value"] > 1

    # a second run reuses every cached result: make one cached value recognisable
    cached = list((tmp_path / "cache" / "eval").glob("*.json"))
    assert len(cached) == 10  # 2 models x (kl, bench, task accuracy, task NLL, perplexity)
    for path in cached:
        entry = json.loads(path.read_text())
        if entry["key"]["kind"] == "bench" and entry["model"].startswith("sha256"):
            entry["result"]["acc"] = 0.123456
            path.write_text(json.dumps(entry))
    assert main(argv) == 0
    again = json.loads((out / "eval.json").read_text())
    assert sum(e["value"] == 0.123456 for e in again["results"]
               if e["metric"] == "bench/bench") == 2  # both models were cached
    assert main(argv + ["--no-cache"]) == 0
    fresh = json.loads((out / "eval.json").read_text())
    assert all(e["value"] != 0.123456 for e in fresh["results"])


def test_model_with_other_vocabulary_is_refused(setup, tiny_model_no_bos, tmp_path, capsys):
    code = main(["eval", "--base", setup["base"], "--model", str(tiny_model_no_bos), "--bench",
                 setup["bench"], "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "tokenizer's vocabulary (257 tokens) differs from the base" in err


def test_nothing_to_evaluate_is_an_error(capsys):
    assert main(["eval"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_compare_pairs_two_models_item_by_item(setup, tiny_model, tmp_path, capsys):
    """`--compare A B`: B − A on every yardstick with paired intervals, and every model paired
    against the base; per-item outcomes land in items.json."""
    a = setup["perturbed"]
    b = str(perturb(tiny_model, tmp_path / "b", scale=0.1, seed=2))
    assert main(["eval", "--base", setup["base"], "--model", a, "--model", b,
                 "--kl-samples", setup["samples"], "--task", setup["task"], "--bench",
                 setup["bench"], "--max-new-tokens", "4", "--compare", f"{a},{b}",
                 "--out", str(tmp_path / "ev"), "--no-cache"]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    items = json.loads((tmp_path / "ev" / "items.json").read_text())
    mean = {s: sum(items[s]["kl"]) / len(items[s]["kl"]) for s in (a, b)}
    assert ev["comparisons"][0]["metrics"]["paired/kl"]["value"] == pytest.approx(mean[b] - mean[a])
    assert set(ev["paired"]) == {a, b}
    assert {"paired/task_nll", "paired/task_acc", "paired/bench"} <= set(ev["paired"][a])
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert "## Paired against the base" in md and "Paired comparisons between runs" in md
    capsys.readouterr()
    assert main(["eval", "--base", setup["base"], "--model", a, "--task", setup["task"],
                 "--compare", f"{a},nope", "--out", str(tmp_path / "x")]) == 2
    assert "--compare takes two of the models evaluated" in capsys.readouterr().err
