"""Instruction yardsticks (issue 10, item 2): reading instruction files (prompt/reference JSONL and
the self-instruct seed format), the clustered SE of the instruction KL, the base's KL ≈ 0 and a
perturbed model's > 0 on the base's own responses, the reference NLL against a plain forward
pass, and `cftune eval --instructions` end to end."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from test_eval_kl import perturb

from cftune.cli import main
from cftune.errors import CftuneError
from cftune.evaluate.instructions import (
    PROMPTS_FILE,
    RESPONSES,
    Instruction,
    compare_per_prompt,
    instruction_kl,
    instruction_spec,
    read_instructions,
    read_prompts,
    reference_nll,
    summarize_kl,
)
from cftune.evaluate.responses import draw_responses
from cftune.generate.samples import iter_samples
from cftune.models import fingerprint, load_model, load_tokenizer
from cftune.prompts import prompt_ids, response_ids

INSTRUCTIONS = [
    {"prompt": "Name a colour.", "reference": "Blue."},
    {"prompt": "Say hi.", "reference": "Hi!"},
    {"prompt": "Count to three.", "reference": "1, 2, 3."},
    {"prompt": "No reference here."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instructions")
    file = write_jsonl(tmp / "instr.jsonl", INSTRUCTIONS)
    folder = draw_responses(str(tiny_model), file, samples_per_prompt=3, max_new_tokens=12,
                            out=tmp / "drawn", batch_size=4, device="cpu")
    return {"base": str(tiny_model), "file": file, "folder": folder,
            "perturbed": str(perturb(tiny_model, tmp / "perturbed", scale=0.1))}


# ------------------------------------------------------------------------------------ reading


def test_self_instruct_rule_input_appended_only_when_non_empty(tmp_path):
    path = write_jsonl(tmp_path / "seed.jsonl", [
        {"id": "a", "instruction": "Suggest a breakfast.", "instances": [
            {"input": "", "output": "Oatmeal."}, {"input": "ignored", "output": "ignored"}]},
        {"id": "b", "instruction": "What is the relation?", "instances": [
            {"input": "Night : Day", "output": "Opposites."}]},
        {"id": "c", "instruction": "Say something.", "instances": [{"input": "  ", "output": ""}]},
    ])
    rows = read_instructions(path)
    assert rows == [Instruction("Suggest a breakfast.", "Oatmeal."),
                    Instruction("What is the relation?\n\nNight : Day", "Opposites."),
                    Instruction("Say something.", None)]


def test_plain_file_with_custom_fields_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "A?", "a": "yes"}, {"q": "B?"}, {"q": "C?"}])
    assert read_instructions(path, "q", "a", limit=2) == [Instruction("A?", "yes"),
                                                          Instruction("B?", None)]
    assert read_instructions(path, "q", "a", limit=1, offset=1) == [Instruction("B?", None)]
    assert read_instructions(path, "q", "a", offset=2) == [Instruction("C?", None)]
    with pytest.raises(CftuneError, match="has 3 records, none from offset 3"):
        read_instructions(path, "q", "a", offset=3)


def test_shared_self_instruct_seed_file(shared_data):
    path = shared_data / "instructions" / "self_instruct_seed_tasks.jsonl"
    rows = read_instructions(path)
    first, second = (json.loads(line) for line in path.read_text().splitlines()[:2])
    assert len(rows) == 175 and all(r.reference for r in rows)
    assert rows[0].prompt == first["instruction"]  # its input is empty
    assert rows[1].prompt == second["instruction"] + "\n\n" + second["instances"][0]["input"]
    assert rows[1].reference == second["instances"][0]["output"]


@pytest.mark.parametrize("rows, fields, message", [
    ([{"prompt": "ok"}, {"question": "no prompt"}], {}, "line 3: field `prompt`"),
    ([{"prompt": "ok", "reference": 3}], {}, "line 1: field `reference` must be text"),
    ([{"prompt": ""}], {}, "line 1: field `prompt` must be non-empty text"),
    ([{"q": "ok"}, ["a list"]], {"prompt_field": "q"}, "line 3: not a JSON object"),
    ([{"instruction": "x", "instances": []}], {}, "line 1: `instances` must be a non-empty list"),
    ([{"instruction": "x", "instances": [{"input": 1}]}], {}, "line 1 (instances[0]): field "
     "`input`"),
])
def test_malformed_rows_fail_with_one_line(tmp_path, rows, fields, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(CftuneError) as e:
        read_instructions(path, **fields)
    text = str(e.value)
    assert "\n" not in text and str(path) in text and message in text, text


def test_bad_json_and_empty_file_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(CftuneError, match=r"bad.jsonl line 2: not valid JSON"):
        read_instructions(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CftuneError, match="is empty"):
        read_instructions(empty)


def test_prompt_format_chat_or_qa(tiny_model, tiny_model_no_bos):
    assert instruction_spec(load_tokenizer(str(tiny_model))).format == "chat"
    assert instruction_spec(load_tokenizer(str(tiny_model_no_bos))).format == "qa"


# ------------------------------------------------------------------------------- statistics


def test_clustered_se_equals_the_formula():
    # P = 3 prompts, k = 2 responses each: sample i answers prompt i mod 3.
    # Responses to one prompt are alike, so the naive SE over responses is too small.
    per_sample = [1.0, 2.0, 3.0, 1.5, 2.5, 3.5]
    out = summarize_kl(per_sample, list(range(6)), n_prompts=3)
    means = [(1 + 1.5) / 2, (2 + 2.5) / 2, (3 + 3.5) / 2]  # prompts 0, 1, 2
    assert out["per_prompt"] == means
    assert out["value"] == pytest.approx(13.5 / 6)
    sd = math.sqrt(sum((m - 2.25) ** 2 for m in means) / 2)  # = 1
    assert out["stderr"] == pytest.approx(sd / math.sqrt(3))
    assert out["stderr"] > 1.4 * statistics.stdev(per_sample) / math.sqrt(6)
    assert out["n_prompts"] == 3 and out["n_responses"] == 6
    half = out["ci95"][1] - out["value"]
    assert half == pytest.approx(4.302653 * out["stderr"], rel=1e-5)  # t(0.975, df = 2)


def test_compare_per_prompt_pairs_by_index():
    a = {"per_prompt": [1.0, 2.0, 3.0], "indices": [0, 2, 3], "instructions_digest": "x"}
    b = {"per_prompt": [0.5, 2.5, 2.0], "indices": [0, 2, 3], "instructions_digest": "x"}
    p = compare_per_prompt(a, b)
    assert p["n"] == 3 and p["delta"] == pytest.approx(-1 / 3)
    with pytest.raises(CftuneError, match="different instruction sets"):
        compare_per_prompt(a, {**b, "instructions_digest": "y"})


# --------------------------------------------------------------------- on a tiny model


def test_responses_answer_prompt_i_mod_p(setup):
    records = list(iter_samples(setup["folder"] / RESPONSES))
    tok = load_tokenizer(setup["base"])
    spec = instruction_spec(tok)
    expected = [prompt_ids(tok, r.prompt, spec) for r in read_prompts(setup["folder"])]
    assert len(records) == 3 * len(INSTRUCTIONS)
    assert all(r["prompt_ids"] == expected[r["id"] % len(INSTRUCTIONS)] for r in records)
    # drawn once: a second call returns the finished folder untouched
    before = (setup["folder"] / RESPONSES / "samples.jsonl").stat().st_mtime_ns
    draw_responses(setup["base"], setup["file"], 3, 12, out=setup["folder"], device="cpu")
    assert (setup["folder"] / RESPONSES / "samples.jsonl").stat().st_mtime_ns == before


def test_a_kept_folder_is_restored_not_drawn_again(setup, tmp_path, monkeypatch):
    """A clone holds `responses/kept.jsonl` and the manifest only (no prompts: they are the
    instruction file's): the responses come back exactly, without sampling; with prompts posed
    otherwise (another instruction file) the restore refuses instead of mispairing them."""
    import shutil

    import cftune.generate.stage as stage
    from cftune.evaluate.responses import KEPT

    kept = (setup["folder"] / RESPONSES / KEPT).read_text()
    assert kept and "prompt_ids" not in kept and INSTRUCTIONS[0]["prompt"] not in kept
    clone = tmp_path / "clone"
    (clone / RESPONSES).mkdir(parents=True)
    for name in (KEPT, "manifest.json"):
        shutil.copy(setup["folder"] / RESPONSES / name, clone / RESPONSES / name)
    monkeypatch.setattr(stage, "generate", lambda config: pytest.fail("drew the responses again"))
    draw_responses(setup["base"], setup["file"], 3, 12, out=clone, device="cpu")
    assert list(iter_samples(clone / RESPONSES)) == list(iter_samples(setup["folder"] / RESPONSES))

    other = write_jsonl(tmp_path / "other.jsonl", [
        {**r, "prompt": r["prompt"] + " Please."} for r in INSTRUCTIONS])
    (clone / RESPONSES / "samples.jsonl").unlink()
    (clone / PROMPTS_FILE).unlink()
    with pytest.raises(CftuneError, match=r"kept.jsonl line 1: its prompt is not posed as"):
        draw_responses(setup["base"], other, 3, 12, out=clone, device="cpu")


def test_instruction_kl_base_zero_perturbed_positive(setup):
    base_fp = fingerprint(setup["base"])
    tok = load_tokenizer(setup["base"])
    base = instruction_kl(load_model(setup["base"], device="cpu"), setup["folder"],
                          base_fingerprint=base_fp, tokenizer=tok)
    assert base["n_prompts"] == 4 and base["n_responses"] == 12 and base["seconds"] >= 0
    assert all(abs(v) < 1e-4 for v in base["per_prompt"])
    assert abs(base["value"]) < 1e-4
    other = instruction_kl(load_model(setup["perturbed"], device="cpu"), setup["folder"],
                           base_fingerprint=base_fp, tokenizer=tok)
    assert other["value"] > 0 and other["ci95"][0] < other["value"] < other["ci95"][1]
    assert compare_per_prompt(base, other)["delta"] == pytest.approx(other["value"])


@torch.no_grad()
def test_reference_nll_equals_a_plain_forward_pass(setup):
    model = load_model(setup["base"], device="cpu")
    tok = load_tokenizer(setup["base"])
    result = reference_nll(model, tok, setup["file"], batch_size=2)
    assert result["skipped"] == 1 and result["indices"] == [0, 1, 2] and result["format"] == "chat"
    spec = instruction_spec(tok)
    for i, nll in zip(result["indices"], result["per_prompt"]):
        row = INSTRUCTIONS[i]
        ctx = prompt_ids(tok, row["prompt"], spec)
        cont = response_ids(tok, row["reference"], spec) + [tok.eos_token_id]
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
        logp = torch.log_softmax(logits[len(ctx) - 1:-1], -1)
        expected = -float(logp.gather(-1, torch.tensor(cont)[:, None]).mean())
        assert nll == pytest.approx(expected, abs=1e-6)
    assert result["value"] == pytest.approx(sum(result["per_prompt"]) / 3)


def test_cli_reports_instruction_yardsticks(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "evals"
    argv = ["eval", "--base", setup["base"], "--model", setup["perturbed"],
            "--instructions", str(setup["file"]), "--instruction-samples", "2",
            "--instruction-max-new-tokens", "8", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "instr_kl" in printed and "Paired against the base" in printed
    report = json.loads((out / "eval.json").read_text())
    rows = {(e["model"], e["metric"]): e for e in report["results"]}
    assert abs(rows[(setup["base"], "instr_kl")]["value"]) < 1e-4
    assert rows[(setup["perturbed"], "instr_kl")]["value"] > 0
    assert rows[(setup["perturbed"], "instr_ref_nll")]["n"] == 3
    paired = report["paired"][setup["perturbed"]]["paired/instr_ref_nll"]
    assert paired["n"] == 3 and paired["value"] == pytest.approx(
        rows[(setup["perturbed"], "instr_ref_nll")]["value"]
        - rows[(setup["base"], "instr_ref_nll")]["value"])
    raw = {r["kind"]: r for r in report["raw"][setup["perturbed"]]}
    assert raw["instr_kl"]["n_responses"] == 8
    drawn = list((tmp_path / "cache" / "instructions").iterdir())
    assert len(drawn) == 1  # the base's responses, drawn once
    assert main(argv) == 0  # cached: same numbers, no new draw
    again = json.loads((out / "eval.json").read_text())
    assert again["results"] == report["results"]
    assert list((tmp_path / "cache" / "instructions").iterdir()) == drawn


def test_qa_prompts_for_a_tokenizer_without_chat_template(tiny_model_no_bos, tmp_path):
    file = write_jsonl(tmp_path / "instr.jsonl", INSTRUCTIONS[:2])
    folder = draw_responses(str(tiny_model_no_bos), file, 2, 8, out=tmp_path / "drawn",
                            device="cpu")
    tok = load_tokenizer(str(tiny_model_no_bos))
    first = next(iter_samples(folder / RESPONSES))
    assert tok.decode(first["prompt_ids"]) == "<|endoftext|>Question: Name a colour.\nAnswer:"
    model = load_model(str(tiny_model_no_bos), device="cpu")
    assert abs(instruction_kl(model, folder)["value"]) < 1e-4
    assert reference_nll(model, tok, file)["format"] == "qa"
