"""Model cards (`cftune.card`): the README.md of a trained, a LoRA and a merged folder in the
Hugging Face Hub's format, the runner's evaluation in it, and `--push-to-hub` against a stand-in
for the hub (this machine is offline: the upload itself is not exercised)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_data import make_cf_folder

from cftune import card
from cftune.cli import main
from cftune.errors import CftuneError
from cftune.experiment.results import card_evaluation, write_cards
from cftune.merge import MergeConfig, merge
from cftune.train.config import TrainConfig
from cftune.train.stage import train

ROWS = [{"question": f"What is {i} plus {i + 3}?", "answer": f"{i}+{i + 3}={2 * i + 3}\n#### {2 * i + 3}"}
        for i in range(24)]
POOL = 40  # CF samples in the pool


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """The tiny base kept as the hub cache keeps a model (its hub id in the path, its license on
    its own card), a task file named for GSM8K, and a CF pool of the base."""
    root = tmp_path_factory.mktemp("cards")
    base = root / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a tiny model\n")
    task = root / "gsm8k" / "train.jsonl"
    task.parent.mkdir()
    task.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfs = make_cf_folder(root / "cfs", base, POOL)
    return {"base": str(base), "task": str(task), "cfs": str(cfs), "root": root}


def config(files, out: Path, **kw) -> TrainConfig:
    values = dict(model=files["base"], task=files["task"], cfs=files["cfs"], out=str(out),
                  prompt_field="question", response_field="answer", max_steps=2, batch_size=4,
                  learning_rate=1e-3, dtype="fp32", save_steps=100, warmup=0.0)
    return TrainConfig(**{**values, **kw})


def read_card(folder: Path) -> tuple[dict, str]:
    """(front matter, body) of a folder's README.md; the front matter must parse as YAML."""
    text = (Path(folder) / "README.md").read_text()
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.fixture(scope="module")
def cfs_run(files):
    return train(config(files, files["root"] / "runs" / "cfs", method="cfs"))


def test_a_trained_folder_gets_a_hub_card_before_its_manifest(files, cfs_run):
    front, body = read_card(cfs_run)
    assert front["base_model"] == "tiny-org/tiny-llama"  # from the hub cache path
    assert front["library_name"] == "transformers"
    assert front["license"] == "mit"  # from the base's own card
    assert front["datasets"] == ["openai/gsm8k"]  # the task file's folder names it
    assert front["tags"][:2] == ["cftune", "cfs"]
    manifest = json.loads((cfs_run / "manifest.json").read_text())
    drawn = manifest["counts"]["cf"]["kept"]
    assert manifest["cf_pool"]["samples"] == POOL and drawn == 8  # 2 steps x 4 x ratio 1
    assert "cftune's `cfs`" in body and "context-free (CF) samples" in body
    assert f"{POOL} samples of the base" in body and "at temperature 1.0" in body
    assert f"trained on the first {drawn} of its {POOL} rows" in body
    task = manifest["counts"]["task"]
    assert manifest["inputs"]["task"] in body and f"{task['rows']} rows → {task['kept']}" in body
    assert "## Evaluation" not in body  # nothing measured yet
    # the card is written before the manifest, whose presence means "finished"
    assert (cfs_run / "README.md").stat().st_mtime_ns <= \
        (cfs_run / "manifest.json").stat().st_mtime_ns


def test_a_lora_adapter_card_names_peft_and_its_merged_copy_transformers(files):
    out = train(config(files, files["root"] / "runs" / "lora", method="lora", lora_rank=2,
                       lora_merge=True))
    assert (out / "adapter_config.json").is_file()
    front, body = read_card(out)  # peft writes a README.md of its own: replaced by ours
    assert front["library_name"] == "peft" and front["base_model"] == "tiny-org/tiny-llama"
    assert {"cftune", "lora"} <= set(front["tags"]) and "LoRA adapter" in body
    assert "| `lora_rank` | 2 |" in body
    merged_front, merged_body = read_card(out / "merged")
    assert merged_front["library_name"] == "transformers"
    assert "merged into the base weights" in merged_body


def test_a_merged_folder_card_names_the_merge_and_its_parent_run(files, cfs_run, tmp_path):
    out = merge(MergeConfig(finetuned=str(cfs_run), alpha=0.25, out=str(tmp_path / "wise")))
    front, body = read_card(out)
    assert front["base_model"] == "tiny-org/tiny-llama" and front["library_name"] == "transformers"
    assert {"cftune", "wise-ft", "merge", "cfs"} <= set(front["tags"])
    assert front["datasets"] == ["openai/gsm8k"] and front["license"] == "mit"
    assert "Wise-FT" in body and "a = 0.25" in body and "trained with cftune's `cfs`" in body
    assert f"{POOL} samples of the base" in body  # the fine-tuned run's CF pool
    assert (out / "README.md").stat().st_mtime_ns <= (out / "manifest.json").stat().st_mtime_ns


def test_the_runner_puts_the_evaluation_with_intervals_on_the_card(files, cfs_run):
    row = {"run": "cfs-s0", "group": "cfs", "metrics": {
        "task_acc": {"value": 0.4125, "stderr": 0.05, "ci95": [0.3222, 0.5031], "n": 80},
        "paired/task_acc": {"value": 0.2875, "ci95": [0.1812, 0.3811], "n": 80},
        "kl": {"value": 3.3003, "stderr": 0.3, "ci95": [2.711, 3.889], "n": 96},
        "bench/arc_easy": {"value": 0.486, "ci95": [0.4421, 0.5299], "n": 500},
        "paired/arc_easy": {"value": 0.034, "ci95": [0.0009, 0.0669], "n": 500},
        "margin/arc_easy": {"value": 0.05, "ci95": [0.03, 0.07], "n": 500}}}
    comparisons = [
        {"ref": "full", "model": "cfs", "metrics": {
            "ratio/kl": {"value": 0.6148, "ci95": [0.5102, 0.7194], "n": 3},
            "paired/kl": {"value": -13.97, "ci95": [-15.64, -12.31], "n": 128}}},
        {"ref": "cfs", "model": "kd", "metrics": {
            "ratio/kl": {"value": 0.4573, "ci95": [0.4, 0.5], "n": 3}}}]  # not about this model
    runner = SimpleNamespace(models={"base": "tiny", "cfs-s0": cfs_run},
                             exp=SimpleNamespace(task=SimpleNamespace(train=files["task"])))
    before, _ = read_card(cfs_run)
    assert write_cards(runner, [row, {"run": "base", "metrics": {}}], comparisons) == 1
    front, body = read_card(cfs_run)
    assert front == before and body.startswith("\n# cfs-s0\n")
    assert "| task accuracy (greedy exact match) | 0.4125 | [0.3222, 0.5031] | 80 |" in body
    assert "| Δ task accuracy | 0.2875 | [0.1812, 0.3811] | 80 |" in body
    assert "KL(base‖model) on held-out CF samples, nats/sample | 3.3 | [2.711, 3.889] | 96 |" \
        in body
    assert "| Δ arc_easy accuracy | 0.034 | [0.0009, 0.0669] | 500 |" in body
    assert "### Against `full` (its run group `cfs`, over seeds)" in body
    assert "| CF KL as a fraction of full's | 0.6148 | [0.5102, 0.7194] | 3 |" in body
    assert "0.4573" not in body and "margin" not in body
    assert [t for t, _ in card_evaluation(row, comparisons)] == [
        "Against the base", "Against `full` (its run group `cfs`, over seeds)"]
    # a record kept without its weights keeps the card it has
    record = files["root"] / "record"
    shutil.copytree(cfs_run, record, ignore=shutil.ignore_patterns("*.safetensors"))
    (record / "README.md").write_text("kept\n")
    assert not card.refresh(record, evaluation=card_evaluation(row, comparisons))
    assert (record / "README.md").read_text() == "kept\n"


def test_front_matter_says_only_what_is_known(files, tmp_path):
    assert card.base_model("smollm2-135m-instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")  # the embedded GGUF's model
    assert card.base_model("gemma3-270m") == ("google/gemma-3-270m", "gemma")
    assert card.base_model("some-org/some-model")[0] == "some-org/some-model"
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert card.base_model(str(plain)) == (None, None)  # a local folder of unknown origin
    assert card.datasets_of("builtin:arithmetic") == []  # generated here: no hub dataset
    assert card.datasets_of("../shared/data/gsm8k/train.jsonl") == ["openai/gsm8k"]
    assert card.datasets_of("data/gsm8k_test.jsonl") == ["openai/gsm8k"]
    assert card.datasets_of("/home/gsm8k/work/mine.jsonl") == []  # only file and folder name
    assert card.datasets_of("data/math.jsonl") == []
    front = yaml.safe_load(card.front_matter(str(plain), "transformers", ["cftune", "full"],
                                             "builtin:arithmetic").split("---\n")[1])
    assert front == {"library_name": "transformers", "tags": ["cftune", "full"]}


class FakeHub:
    """Stands in for `huggingface_hub.HfApi`: records each call, and what the folder held then."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        held = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kw, held))


def test_push_to_hub_uploads_the_finished_folder_without_checkpoints(files, tmp_path,
                                                                    monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "calls", [])
    out = tmp_path / "pushed"
    train(config(files, out, method="full", push_to_hub="me/tiny-full", keep_checkpoints=True,
                 save_steps=1))
    assert (out / "checkpoints").is_dir()  # kept here, so the upload must leave them out
    (create, repo, kw), (upload, args, held) = FakeHub.calls
    assert (create, repo) == ("create_repo", "me/tiny-full") and kw["exist_ok"] is True
    assert upload == "upload_folder" and args["repo_id"] == "me/tiny-full"
    assert Path(args["folder_path"]) == out and args["repo_type"] == "model"
    assert "checkpoints/**" in args["ignore_patterns"]
    assert {"README.md", "manifest.json", "model.safetensors", "tokenizer.json",
            "config.json"} <= set(held)  # after the manifest: a finished folder
    # a finished run asked again only uploads; a failed upload is one line, the run kept
    FakeHub.calls.clear()

    def refuse(self, **kw):
        raise OSError("401 Client Error: Unauthorized\nmore detail")
    monkeypatch.setattr(FakeHub, "upload_folder", refuse)
    with pytest.raises(CftuneError, match=r"upload of .* to the hub repo me/tiny-full failed "
                                          r"\(OSError: 401 Client Error: Unauthorized\)"):
        train(config(files, out, method="full", push_to_hub="me/tiny-full",
                     keep_checkpoints=True, save_steps=1))
    assert [c[0] for c in FakeHub.calls] == ["create_repo"]
    assert (out / "manifest.json").is_file()


def test_push_to_hub_takes_a_repo_id_only(files, tmp_path, capsys):
    argv = ["train", "--model", files["base"], "--task", files["task"], "--method", "full",
            "--prompt-field", "question", "--response-field", "answer",
            "--out", str(tmp_path / "o"), "--push-to-hub", "not a repo/x/y"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "`push_to_hub` = 'not a repo/x/y' is not a hub repo id" in err and "\n" not in err


def test_cftune_run_writes_each_evaluated_model_its_card(tiny_model, tmp_path, capsys):
    from test_run import write_config

    from cftune.experiment.execute import RunConfig, run

    path = write_config(tmp_path, tiny_model, runs=[
        {"name": "full", "method": "full"},
        {"name": "wise", "method": "wise-ft", "of": "full", "alphas": [0.5]}])
    out = run(RunConfig(experiment=str(path), out=str(tmp_path / "e")))
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    for name, tag in (("full", "full"), ("wise-a0.5", "wise-ft")):
        (folder,) = (out / "runs").glob(f"{name}-*")
        front, body = read_card(folder)
        assert tag in front["tags"] and body.startswith(f"\n# {name}\n")
        acc = rows[name]["metrics"]["task_acc"]
        lo, hi = acc["ci95"]
        assert (f"| task accuracy (greedy exact match) | {acc['value']:.4g} | [{lo:.4g}, "
                f"{hi:.4g}] | {acc['n']} |") in body
    assert "(rows of `builtin:arithmetic`)" in read_card(next((out / "runs").glob("full-*")))[1]
