"""The dataset stage: capture validation, filtering, deduplication, the hash split, masking, the card."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.trainer.conftest import MODEL_DIR, capture_record, developer_records, write_jsonl
from trainer.cli import main
from trainer.config import load_config
from trainer.data import IGNORE_INDEX, build_dataset, encode, load_dataset, load_tokenizer
from trainer.errors import DataError
from trainer.records import Example


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL_DIR)


def _cfg(*files: Path, **kw):
    return load_config(
        None,
        {
            "data": [str(f) for f in files],
            "human_eval_seed": False,
            "base_model": str(MODEL_DIR),
            "max_seq_len": 128,
            "eval_fraction": 0.2,
            **kw,
        },
    )


def test_keeps_only_successful_exchanges_of_the_chosen_agent_once(tmp_path: Path, tokenizer) -> None:
    capture = write_jsonl(tmp_path / "cap.jsonl", developer_records())
    ds = build_dataset(_cfg(capture), tmp_path / "ds", tokenizer)
    source = ds.card["sources"][0]
    assert (source["records"], source["other_agent"], source["not_success"], source["kept"]) == (18, 1, 1, 16)
    assert ds.card["counts"]["duplicates"] == 1
    assert len(ds.train) + len(ds.eval) == 15
    assert len({e.id for e in ds.train + ds.eval}) == 15
    assert all("oops" not in e.response for e in ds.train + ds.eval)
    assert source["sha256"] and len(ds.card["hash"]) == 64


def test_split_depends_on_content_not_on_file_order(tmp_path: Path, tokenizer) -> None:
    records = developer_records()
    a = build_dataset(_cfg(write_jsonl(tmp_path / "a.jsonl", records)), tmp_path / "a", tokenizer)
    random.Random(1).shuffle(records)
    b = build_dataset(_cfg(write_jsonl(tmp_path / "b.jsonl", records)), tmp_path / "b", tokenizer)
    assert {e.id for e in a.eval} == {e.id for e in b.eval}
    assert a.hash == b.hash
    # More data never moves an existing example to the other side.
    more = [*records, *(capture_record(99, f"Write div_{k}(x).", f"def div_{k}(x): return x / {k}") for k in range(20))]
    c = build_dataset(_cfg(write_jsonl(tmp_path / "c.jsonl", more)), tmp_path / "c", tokenizer)
    assert {e.id for e in a.eval} <= {e.id for e in c.eval}
    assert {e.id for e in a.train} <= {e.id for e in c.train}


def test_loss_is_on_the_assistant_reply_and_end_of_turn_only(tokenizer) -> None:
    ex = Example(
        (("system", "Be brief."), ("user", "Say hi."), ("assistant", "Hi."), ("user", "Again.")), "Hi again!", "t:1"
    )
    enc = encode(tokenizer, ex)
    assert enc is not None
    learned = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Hi again!<|im_end|>"
    # Everything before the reply (system, earlier turns, the assistant header) is context only.
    first = enc.labels.index(next(label for label in enc.labels if label != IGNORE_INDEX))
    prompt = tokenizer.apply_chat_template(ex.chat(), add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(enc.input_ids[:first]) == prompt
    assert enc.labels[first:] == enc.input_ids[first:]


def test_card_counts_long_examples_and_token_statistics(tmp_path: Path, tokenizer) -> None:
    records = [*developer_records(), capture_record(50, "Explain everything.", "word " * 400)]
    ds = build_dataset(_cfg(write_jsonl(tmp_path / "cap.jsonl", records)), tmp_path / "ds", tokenizer)
    card = json.loads((tmp_path / "ds" / "card.json").read_text())
    assert card["counts"]["too_long"] == 1
    stats = card["tokens"]["train"]
    assert stats["examples"] == len(ds.train)
    assert stats["total"]["max"] <= 128
    assert stats["assistant"]["sum"] + stats["prompt"]["sum"] == stats["total"]["sum"]
    reloaded = load_dataset(tmp_path / "ds")
    assert [e.id for e in reloaded.train] == [e.id for e in ds.train]


BAD_FILES = {
    "empty file": ("", None, "empty file"),
    "blank lines only": ("\n  \n", None, "empty file"),
    "malformed line": ('{"messages": [\n', 1, "malformed JSON"),
    "missing response": (
        json.dumps({"messages": [{"role": "user", "content": "x"}], "agent": "developer", "outcome": "success"}),
        1,
        "missing field 'response'",
    ),
    "missing messages": (
        json.dumps({"response": "y", "agent": "developer", "outcome": "success"}),
        1,
        "missing field 'messages'",
    ),
    "empty messages": (
        json.dumps({"messages": [], "response": "y", "agent": "developer", "outcome": "success"}),
        1,
        "non-empty list",
    ),
    "bad role": (
        json.dumps(
            {
                "messages": [{"role": "robot", "content": "x"}],
                "response": "y",
                "agent": "developer",
                "outcome": "success",
            }
        ),
        1,
        "role 'robot'",
    ),
    "bad outcome": (
        json.dumps(
            {"messages": [{"role": "user", "content": "x"}], "response": "y", "agent": "developer", "outcome": "great"}
        ),
        1,
        "'outcome'",
    ),
    "not an object": ("[1, 2]\n", 1, "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_capture_names_file_and_line_and_writes_nothing(case: str, tmp_path: Path, tokenizer) -> None:
    text, line, message = BAD_FILES[case]
    good = write_jsonl(tmp_path / "good.jsonl", developer_records()[:3])
    bad = tmp_path / "bad.jsonl"
    # The bad record comes after good ones where the case has a line: the error must name that line.
    bad.write_text(text if line is None else json.dumps(developer_records()[0]) + "\n" + text)
    out = tmp_path / "out" / "ds"
    with pytest.raises(DataError) as err:
        build_dataset(_cfg(good, bad), out, tokenizer)
    assert err.value.path == str(bad)
    assert err.value.line == (None if line is None else line + 1)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{bad}:{line + 1}:" if line is not None else f"{bad}:")
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_capture_file_is_a_data_error(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(DataError, match="file not found"):
        build_dataset(_cfg(tmp_path / "nope.jsonl"), tmp_path / "ds", tokenizer)


def test_cli_reports_bad_data_in_one_line_with_exit_status_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(developer_records()[0]) + "\nnot json\n")
    rc = main(
        [
            "dataset",
            "--data",
            str(bad),
            "--no-human-eval-seed",
            "--base-model",
            str(MODEL_DIR),
            "--out",
            str(tmp_path / "ds"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"qlp train: error: {bad}:2: malformed JSON")
    assert not (tmp_path / "ds").exists()


def test_existing_dataset_is_replaced_only_when_the_new_one_is_complete(tmp_path: Path, tokenizer) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", developer_records())
    out = tmp_path / "ds"
    first = build_dataset(_cfg(good), out, tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n")
    with pytest.raises(DataError):
        build_dataset(_cfg(good, bad), out, tokenizer, replace=True)
    assert load_dataset(out).hash == first.hash


def test_human_eval_seed_covers_every_task_and_a_cap_keeps_the_split_ratio(tmp_path: Path, tokenizer) -> None:
    cfg = load_config(
        None,
        {
            "human_eval_seed": True,
            "base_model": str(MODEL_DIR),
            "max_seq_len": 1024,
            "eval_fraction": 0.25,
            "max_examples": 60,
        },
    )
    ds = build_dataset(cfg, tmp_path / "ds", tokenizer)
    assert ds.card["human_eval_seed"]["tasks"] == 164 and ds.card["counts"]["candidates"] == 164
    assert len(ds.train) + len(ds.eval) == 60
    assert 5 <= len(ds.eval) <= 25  # about a quarter, not the 60 lowest split hashes (all eval)
    assert ds.card["eval_tasks"] == [e.task_id for e in ds.eval]
