"""rledit.data: the five record formats, bad-record reports, file types, bundled datasets and edit streams."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

from rledit.data import (
    DATA_ENV,
    DataError,
    EditStream,
    data_dir,
    dataset_file,
    detect_format,
    load_file,
    load_requests,
)
from rledit.data.files import SKIP_LIST_NAME, read_records
from rledit.data.formats import FORMATS
from rledit.types import EditRequest, PromptAnswer

FIXTURES = Path(__file__).parent / "data"
BUNDLED = Path(__file__).resolve().parents[1] / "data"

# First records of each format, copied from the real files (trimmed to what the loaders read).
MEND = {"subject": "IAAF Combined Events Challenge",
        "src": "When was the inception of IAAF Combined Events Challenge?", "pred": "2011",
        "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": "2006", "answers": ["1998"],
        "loc": "nq question: what is the name of the last episode of spongebob", "loc_ans": "The String"}
KNOWEDIT = {"subject": "Epaspidoceras", "target_new": "Noctuidae",
            "prompt": "Which family does Epaspidoceras belong to?", "ground_truth": ["Aspidoceratidae"],
            "rephrase_prompt": "What family are Epaspidoceras?",
            "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is",
                                                   "ground_truth": ["genus"]}]}}
RLEDIT = {"src": MEND["src"], "rephrase": MEND["rephrase"], "ans": "2006", "loc": MEND["loc"], "loc_ans": "The String"}
CF_EASYEDIT = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
               "subject": "Danielle Darrieux", "ground_truth": "French",
               "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
               "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
CF_ROME = {"case_id": 4482,
           "requested_rewrite": {"prompt": "{} originates from", "subject": "Spike Hughes",
                                 "target_new": {"str": "Philadelphia"}, "target_true": {"str": "London"}},
           "paraphrase_prompts": ["Amateur Athletic Union (AAU). Spike Hughes was born in"],
           "neighborhood_prompts": ["Max Mosley originates from"], "attribute_prompts": [],
           "generation_prompts": []}
GOOD = {"zsre-mend": MEND, "zsre-knowedit": KNOWEDIT, "zsre-rledit": RLEDIT,
        "counterfact-easyedit": CF_EASYEDIT, "counterfact-rome": CF_ROME}


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def load_error(tmp_path: Path, records: list, name: str = "recs.json") -> str:
    with pytest.raises(DataError) as info:
        load_file(write_json(tmp_path / name, records))
    return str(info.value)


@pytest.fixture(scope="module")
def bundled() -> dict[tuple[str, str], list[EditRequest]]:
    pairs = [("zsre", "eval"), ("zsre", "train"), ("zsre-knowedit", "eval"), ("counterfact", "train"),
             ("counterfact", "eval")]
    return {pair: load_requests(*pair) for pair in pairs}


def raw(name: str) -> list[dict]:
    with gzip.open(BUNDLED / name, "rt", encoding="utf-8") as handle:
        return json.load(handle)


# ---------------------------------------------------------------- bundled data


def test_bundled_counts_and_every_record_loads(bundled):
    assert len(bundled["zsre", "eval"]) == 1037
    assert len(bundled["zsre-knowedit", "eval"]) == 1304
    assert len(bundled["counterfact", "train"]) == 10000
    assert len(bundled["counterfact", "eval"]) == 10000
    assert len(read_records(dataset_file("zsre", "train"))) == 10000
    assert len(bundled["zsre", "train"]) == 10000 - 35
    for requests in bundled.values():
        assert all(isinstance(r, EditRequest) and r.rephrase_prompts and r.locality for r in requests)


def test_train_skip_list_is_exactly_the_records_without_a_target(bundled):
    records = raw("zsre_train.json.gz")
    empty = {i for i, r in enumerate(records) if not r["alt"].strip()}
    listed = json.loads((BUNDLED / SKIP_LIST_NAME).read_text())["zsre_train.json.gz"]["indices"]
    assert set(listed) == empty and len(empty) == 35
    loaded = {int(r.source.split("#")[1]) for r in bundled["zsre", "train"]}
    assert loaded == set(range(10000)) - empty


def test_bundled_files_match_the_sha256_in_sources_md():
    table = (BUNDLED / "SOURCES.md").read_text()
    rows = re.findall(r"\| `(\w+\.json\.gz)` \|.*`([0-9a-f]{64})` \|", table)
    assert len(rows) == 5
    for name, sha in rows:
        with gzip.open(BUNDLED / name, "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == sha, name


def test_every_counterfact_edit_record_maps_field_by_field(bundled):
    for index, (record, request) in enumerate(zip(raw("counterfact_edit.json.gz"), bundled["counterfact", "eval"])):
        assert request == EditRequest(
            prompt=record["prompt"], target_new=record["target_new"], subject=record["subject"],
            ground_truth=record["ground_truth"], rephrase_prompts=(record["rephrase_prompt"],),
            locality=(PromptAnswer(record["locality_prompt"], record["locality_ground_truth"], "neighborhood"),),
            source=f"counterfact_edit.json.gz#{index}")


def test_every_zsre_eval_record_maps_field_by_field(bundled):
    for record, request in zip(raw("zsre_eval.json.gz"), bundled["zsre", "eval"]):
        assert request.prompt == record["src"] and request.subject == record["subject"]
        assert request.target_new == record["alt"].strip()
        assert request.ground_truth == record["answers"][0]
        assert request.locality == (PromptAnswer(record["loc"], record["loc_ans"], "nq"),)
        assert request.portability[0].answer == record["portability"]["New Answer"]


# ---------------------------------------------------------------- each format on real first records


def test_zsre_mend_first_eval_record(bundled):
    first = bundled["zsre", "eval"][0]
    assert first == EditRequest(
        prompt="When was the inception of IAAF Combined Events Challenge?", target_new="2006",
        subject="IAAF Combined Events Challenge", ground_truth="1998",
        rephrase_prompts=("When was the IAAF Combined Events Challenge launched?",),
        locality=(PromptAnswer("nq question: what is the name of the last episode of spongebob", "The String", "nq"),),
        portability=(PromptAnswer("What type of sports event is the IAAF Combined Events Challenge, which was "
                                  "established in 2006?", "Athletics", "One_Hop"),),
        source="zsre_eval.json.gz#0")
    assert bundled["zsre", "eval"][27].target_new == "species"  # published as " species"
    assert bundled["zsre", "eval"][115].ground_truth == "Louise Lester"  # first of three answers


def test_zsre_mend_first_train_record(bundled):
    first = bundled["zsre", "train"][0]
    assert (first.prompt, first.target_new, first.subject, first.ground_truth) == (
        "What is the native language of Christiane Cohendy?", "German", "Christiane Cohendy", "French")
    assert first.rephrase_prompts == ("What's Christiane Cohendy's mother tongue?",)
    assert first.locality == (PromptAnswer("nq question: what is the most current season of the walking dead",
                                           "The eighth season", "nq"),)
    assert first.portability == () and first.source == "zsre_train.json.gz#0"


def test_zsre_knowedit_first_record(bundled):
    first = bundled["zsre-knowedit", "eval"][0]
    assert first == EditRequest(
        prompt="Which family does Epaspidoceras belong to?", target_new="Noctuidae", subject="Epaspidoceras",
        ground_truth="Aspidoceratidae", rephrase_prompts=("What family are Epaspidoceras?",),
        locality=(PromptAnswer("The taxon rank of Epaspidoceras is", "genus", "Relation_Specificity"),
                  PromptAnswer("Epaspidoceras taxon rank", "genus", "Relation_Specificity")),
        portability=(PromptAnswer("What is the common name for the family Epaspidoceras belongs to?", "Owlet moths",
                                  "Reasoning"),),
        source="zsre_knowedit_eval.json.gz#0")
    assert bundled["zsre-knowedit", "eval"][32].ground_truth == "Minnesota Wild"  # first of two


def test_counterfact_easyedit_first_records(bundled):
    assert bundled["counterfact", "eval"][0] == EditRequest(
        prompt="The mother tongue of Danielle Darrieux is", target_new="English", subject="Danielle Darrieux",
        ground_truth="French", rephrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        locality=(PromptAnswer("Michel Rocard is a native speaker of", "French", "neighborhood"),),
        source="counterfact_edit.json.gz#0")
    train = bundled["counterfact", "train"][0]
    assert (train.prompt, train.target_new, train.ground_truth) == ("Toko Yasuda, the", "piano", "guitar")


def test_counterfact_rome_fixture():
    requests = load_file(FIXTURES / "counterfact_rome.json")
    first = requests[0]
    assert len(requests) == 3
    assert (first.prompt, first.subject, first.target_new, first.ground_truth) == (
        "Spike Hughes originates from", "Spike Hughes", "Philadelphia", "London")
    assert first.rephrase_prompts == (
        "Incumbent Mayor Jim Suttle sought a second term in office. Spike Hughes is native to",
        "Amateur Athletic Union (AAU). Spike Hughes was born in")
    assert len(first.locality) == 10
    assert first.locality[0] == PromptAnswer("Max Mosley originates from", "London", "neighborhood")
    assert {p.answer for p in first.locality} == {"London"}
    assert first.portability == (PromptAnswer(
        "What famous food is associated with the city where Spike Hughes originates from?", "Cheesesteaks",
        "One_Hop"),)
    assert first.source == "counterfact_rome.json#0"


def test_zsre_rledit_fixture_jsonl():
    requests = load_file(FIXTURES / "zsre_rledit.jsonl")
    assert len(requests) == 3
    assert requests[2] == EditRequest(
        prompt="What artist created Call the Doctor?", target_new="The X-Files",
        rephrase_prompts=("Which artist created Call the Doctor?",),
        locality=(PromptAnswer("nq question: who sang nice day for a white wedding", "Billy Idol", "nq"),),
        source="zsre_rledit.jsonl#2")


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("name", list(GOOD))
def test_detect_format(name):
    assert detect_format(GOOD[name]) == name


def test_detect_format_on_real_files():
    assert detect_format(read_records(FIXTURES / "counterfact_rome.json")[0]) == "counterfact-rome"
    assert detect_format(read_records(FIXTURES / "zsre_rledit.jsonl")[0]) == "zsre-rledit"
    assert detect_format(raw("zsre_knowedit_eval.json.gz")[0]) == "zsre-knowedit"
    assert detect_format(raw("counterfact_train.json.gz")[0]) == "counterfact-easyedit"


def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError) as info:
        detect_format({"question": "q", "answer": "a"})
    message = load_error(tmp_path, [{"question": "q", "answer": "a"}])
    for text in (str(info.value), message):
        assert "['answer', 'question']" in text
        for fmt in FORMATS:
            assert f"{fmt.name}: {', '.join(fmt.required)}" in text


# ---------------------------------------------------------------- bad records


def mutated(base: dict, path: str, value=None, delete: bool = False) -> dict:
    record = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return record


BAD_CASES = [
    ("zsre-mend", "alt", None, True, "missing key 'alt'"),
    ("zsre-mend", "src", "   ", False, "'src' is empty"),
    ("zsre-mend", "alt", ["2006"], False, "'alt' must be a string, got list"),
    ("zsre-mend", "answers", [], False, "'answers' is an empty list"),
    ("zsre-mend", "rephrase", 7, False, "'rephrase' must be a string or a list of strings, got int"),
    ("zsre-rledit", "src", "Who founded {}?", False, "'src' has a '{}' placeholder but the record has no subject"),
    ("zsre-knowedit", "locality.Relation_Specificity.0.ground_truth", None, True,
     "'locality.Relation_Specificity[0]' lacks ['ground_truth']"),
    ("zsre-knowedit", "locality", ["x"], False, "'locality' must be an object"),
    ("zsre-knowedit", "target_new", "", False, "'target_new' is empty"),
    ("counterfact-easyedit", "locality_ground_truth", None, False, "'locality_ground_truth' is null"),
    ("counterfact-rome", "requested_rewrite.prompt", "Spike Hughes originates from", False,
     "'requested_rewrite.prompt' has no '{}' placeholder for the subject"),
    ("counterfact-rome", "requested_rewrite.target_new", "Philadelphia", False,
     "'requested_rewrite.target_new' must be an object, got str"),
    ("counterfact-rome", "requested_rewrite.subject", None, True, "missing key 'requested_rewrite.subject'"),
]


@pytest.mark.parametrize("fmt, path, value, delete, reason", BAD_CASES)
def test_bad_record_is_reported_with_file_index_and_reason(tmp_path, fmt, path, value, delete, reason):
    record = mutated(GOOD[fmt], path, value, delete)
    message = load_error(tmp_path, [GOOD[fmt], record, GOOD[fmt]])
    assert f"recs.json#1: {reason}" in message
    assert "1 bad record(s)" in message and "#0" not in message and "#2" not in message


@pytest.mark.parametrize("fmt", list(GOOD))
def test_every_required_key_is_enforced(tmp_path, fmt):
    spec = next(f for f in FORMATS if f.name == fmt)
    for key in (k.split("{")[0] for k in spec.required):
        if key in spec.markers and len(spec.markers) == 1:
            continue  # without its only marker the record is in no format at all
        message = load_error(tmp_path, [GOOD[fmt], mutated(GOOD[fmt], key, delete=True)])
        line = next(line for line in message.splitlines() if "recs.json#1: " in line)
        assert line.endswith(f"missing key '{key}'"), key


def test_all_problems_are_collected_and_long_lists_are_cut(tmp_path):
    records = [MEND] + [mutated(MEND, "alt", "") for _ in range(25)] + ["not a record"]
    message = load_error(tmp_path, records)
    assert "26 bad record(s)" in message
    assert "recs.json#1: 'alt' is empty" in message and "recs.json#20: 'alt' is empty" in message
    assert "recs.json#21:" not in message and "... and 6 more" in message
    several = load_error(tmp_path, [mutated(mutated(MEND, "alt", 3), "loc", delete=True)])
    assert "recs.json#0: 'alt' must be a string, got int; missing key 'loc'" in several


def test_non_object_record_and_mixed_formats_are_reported(tmp_path):
    assert "recs.json#1: record must be a JSON object, got str" in load_error(tmp_path, [MEND, "oops"])
    mixed = load_error(tmp_path, [MEND, CF_EASYEDIT])
    assert "recs.json#1: looks like format counterfact-easyedit, but the file is in format zsre-mend; " \
        "missing key 'src'" in mixed


def test_skip_list_leaves_out_listed_bad_records_and_rejects_stale_entries(tmp_path):
    write_json(tmp_path / "recs.json", [MEND, mutated(MEND, "alt", ""), MEND])
    (tmp_path / SKIP_LIST_NAME).write_text(json.dumps({"recs.json": {"reason": "no target", "indices": [1]}}))
    assert [r.source for r in load_file(tmp_path / "recs.json")] == ["recs.json#0", "recs.json#2"]
    (tmp_path / SKIP_LIST_NAME).write_text(json.dumps({"recs.json": {"reason": "?", "indices": [0, 1]}}))
    with pytest.raises(DataError, match="recs.json#0: listed as a known bad record to skip, but it is valid"):
        load_file(tmp_path / "recs.json")
    (tmp_path / SKIP_LIST_NAME).write_text(json.dumps({"recs.json": {"reason": "?", "indices": [1, 3]}}))
    with pytest.raises(DataError, match="recs.json#3: listed as a known bad record to skip, but the file has only 3"):
        load_file(tmp_path / "recs.json")
    (tmp_path / SKIP_LIST_NAME).write_text(json.dumps({"recs.json": {"indices": ["1"]}}))
    with pytest.raises(DataError, match="malformed skip list"):
        load_file(tmp_path / "recs.json")


# ---------------------------------------------------------------- file types


def test_json_gz_jsonl_and_jsonl_gz_give_the_same_requests(tmp_path):
    records = [MEND, mutated(MEND, "src", "Where was {} born?")]
    lines = "".join(json.dumps(r) + "\n\n" for r in records)
    write_json(tmp_path / "a.json", records)
    with gzip.open(tmp_path / "a.json.gz", "wt", encoding="utf-8") as handle:
        json.dump(records, handle)
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(lines)
    loaded = {name: load_file(tmp_path / name) for name in ("a.json", "a.json.gz", "a.jsonl", "a.jsonl.gz")}
    expected = [r.to_dict() | {"source": ""} for r in loaded["a.json"]]
    assert loaded["a.json"][1].prompt == "Where was IAAF Combined Events Challenge born?"
    for name, requests in loaded.items():
        assert [r.to_dict() | {"source": ""} for r in requests] == expected
        assert [r.source for r in requests] == [f"{name}#0", f"{name}#1"]


@pytest.mark.parametrize("name, content, reason", [
    ("a.txt", "[]", "unsupported file type"),
    ("a.json", '[{"src": 1,}]', "invalid JSON at line 1, column 12"),
    ("a.json", json.dumps({"data": [MEND]}), "expected a JSON array of records, got a JSON dict"),
    ("a.json", "[]", "the file holds no records"),
    ("a.jsonl", json.dumps(MEND) + "\n{broken\n", "invalid JSON at line 2"),
])
def test_unreadable_files(tmp_path, name, content, reason):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(reason)):
        load_file(tmp_path / name)


# ---------------------------------------------------------------- load_requests / dataset_file


def test_named_sources_splits_and_limit(tmp_path):
    assert dataset_file("counterfact", "edit") == dataset_file("counterfact", "eval") == \
        data_dir() / "counterfact_edit.json.gz"
    assert dataset_file("zsre", "train").name == "zsre_train.json.gz"
    first = load_requests("zsre", limit=5)
    assert [r.source for r in first] == [f"zsre_eval.json.gz#{i}" for i in range(5)]
    path = write_json(tmp_path / "mine.json", [MEND, MEND])
    assert dataset_file(str(path), "train") == path
    assert len(load_requests(path, split="anything")) == 2
    with pytest.raises(DataError, match=r"dataset 'zsre-knowedit' has no split 'train'; its splits: \['eval'\]"):
        load_requests("zsre-knowedit", "train")
    with pytest.raises(DataError, match="neither a named dataset"):
        load_requests("zsre-typo")
    with pytest.raises(DataError, match="limit=3 but mine.json holds only 2 valid requests"):
        load_requests(path, limit=3)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_requests(path, limit=0)


def test_rledit_data_env_points_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(DataError, match=re.escape(f"looked for {tmp_path / 'zsre_eval.json.gz'} in ${DATA_ENV}")):
        load_requests("zsre")
    write_json(tmp_path / "x.json", [MEND])
    (tmp_path / "x.json").rename(tmp_path / "zsre_eval.json.gz")  # wrong compression: reported, not guessed
    with pytest.raises(DataError, match="cannot read the file"):
        load_requests("zsre")
    with gzip.open(tmp_path / "zsre_eval.json.gz", "wt", encoding="utf-8") as handle:
        json.dump([MEND, MEND], handle)
    assert [r.source for r in load_requests("zsre")] == ["zsre_eval.json.gz#0", "zsre_eval.json.gz#1"]


# ---------------------------------------------------------------- EditStream


def requests_named(n: int) -> list[EditRequest]:
    return [EditRequest(prompt=f"q{i}", target_new=f"a{i}", source=f"f#{i}") for i in range(n)]


def test_stream_in_file_order_without_seed():
    stream = EditStream(requests_named(10), steps=3, batch=2)
    steps = list(stream)
    assert len(stream) == 3 and len(steps) == 3
    assert [[r.prompt for r in step] for step in steps] == [["q0", "q1"], ["q2", "q3"], ["q4", "q5"]]
    assert list(stream) == steps  # iterating again gives the same steps


def test_stream_seeded_shuffle_is_deterministic_and_without_replacement():
    requests = requests_named(50)
    a = [[r.prompt for r in step] for step in EditStream(requests, steps=5, batch=10, seed=7)]
    b = [[r.prompt for r in step] for step in EditStream(requests, steps=5, batch=10, seed=7)]
    c = [[r.prompt for r in step] for step in EditStream(requests, steps=5, batch=10, seed=8)]
    assert a == b and a != c
    flat = [p for step in a for p in step]
    assert sorted(flat) == sorted(r.prompt for r in requests) and flat != [r.prompt for r in requests]
    assert all(len(step) == 10 for step in a)


def test_stream_rejects_too_few_requests_and_bad_arguments():
    with pytest.raises(DataError, match="a 4x3 stream needs 12 requests but only 11 were given"):
        EditStream(requests_named(11), steps=4, batch=3)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        EditStream(requests_named(11), steps=2, batch=0)
    with pytest.raises(TypeError, match="requests must be EditRequest objects, got dict"):
        EditStream([{"prompt": "q", "target_new": "a"}], steps=1, batch=1)
