"""Benchmark loaders on the real task files, the generic format, input errors and the split."""

from __future__ import annotations

import gzip
import json

import pytest

from automixer_ray.config import TasksConfig
from automixer_ray.tasks import (
    KNOWN_TASKS,
    Example,
    TaskError,
    find_task_files,
    limit_examples,
    load_task,
    load_tasks,
    prepare_task_splits,
    preprocess_hellaswag,
    split_examples,
)

# Record counts of the real files and the number of choices each benchmark has.
EXPECTED = {
    "arc_easy": ("arc_easy/test.jsonl", 2376, {3, 4, 5}),
    "arc_challenge": ("arc_challenge/validation.jsonl", 294, {3, 4, 5}),
    "boolq": ("boolq/validation.jsonl", 3270, {2}),
    "hellaswag": ("hellaswag/validation.jsonl.gz", 10042, {4}),
    "openbookqa": ("openbookqa/validation.jsonl", 500, {4}),
    "piqa": ("piqa/validation.jsonl", 1838, {2}),
    "siqa": ("siqa/validation.jsonl", 1954, {3}),
    "winogrande": ("winogrande/validation.jsonl", 1267, {2}),
}


def _write_jsonl(path, records, *, raw_lines=()):
    lines = [json.dumps(record) for record in records] + list(raw_lines)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def _generic(index, *, gold=0, choices=(" a", " b")):
    return {"id": f"ex-{index}", "context": f"Context {index}:", "choices": list(choices), "gold": gold}


@pytest.fixture(scope="module")
def real_tasks(shared_data):
    tasks_dir = shared_data / "tasks"
    files = find_task_files(str(tasks_dir), [])
    return {name: load_task(name, uri) for name, uri in files.items()}


def test_find_task_files_all_known(shared_data):
    files = find_task_files(str(shared_data / "tasks"), [])
    assert sorted(files) == sorted(KNOWN_TASKS)
    for name, (relative, _, _) in EXPECTED.items():
        assert files[name] == str(shared_data / "tasks" / relative)


def test_find_task_files_missing_name(shared_data):
    with pytest.raises(TaskError, match="no_such_task"):
        find_task_files(str(shared_data / "tasks"), ["boolq", "no_such_task"])


def test_find_task_files_missing_root(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        find_task_files(str(tmp_path / "absent"), [])


def test_find_task_files_prefers_validation(tmp_path):
    (tmp_path / "piqa").mkdir()
    _write_jsonl(tmp_path / "piqa" / "test.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    _write_jsonl(tmp_path / "piqa" / "validation.jsonl.gz", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}])
    files = find_task_files(str(tmp_path), [])
    assert files == {"piqa": f"{tmp_path}/piqa/validation.jsonl.gz"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loader_real_file(real_tasks, name):
    _, count, choice_counts = EXPECTED[name]
    examples = real_tasks[name]
    assert len(examples) == count
    assert len({example.example_id for example in examples}) == count
    for example in examples:
        assert example.task == name
        assert len(example.choices) in choice_counts
        assert 0 <= example.gold < len(example.choices)
        assert all(choice.startswith(" ") for choice in example.choices)


def test_arc_easy_prompt(real_tasks):
    example = real_tasks["arc_easy"][0]
    assert example.example_id == "ARC-Easy-test-0000"
    assert example.context == ("Question: Which statement best explains why photosynthesis is the "
                               "foundation of most food webs?\nAnswer:")
    assert example.choices[0] == " Sunlight is the source of energy for nearly all ecosystems."
    assert example.gold == 0


def test_arc_challenge_prompt(real_tasks):
    example = real_tasks["arc_challenge"][0]
    assert example.example_id == "Mercury_SC_407695"
    assert example.context.startswith("Question: Juan and LaKeisha roll a few objects down a ramp.")
    assert example.context.endswith("repeat their investigation?\nAnswer:")
    assert example.choices[3] == " Record the details of the investigation."
    assert example.gold == 3


def test_boolq_prompt(real_tasks):
    example = real_tasks["boolq"][0]
    assert example.context.startswith("All biomass goes through at least some of these steps")
    assert example.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert example.choices == (" no", " yes")
    assert example.gold == 0


def test_hellaswag_prompt(real_tasks):
    example = real_tasks["hellaswag"][0]
    assert example.example_id == "0"
    assert example.context == "Roof shingle removal: A man is sitting on a roof. he"
    assert example.choices[3] == " starts pulling up roofing on a roof."
    assert example.gold == 3


def test_hellaswag_drops_brackets(real_tasks):
    example = next(e for e in real_tasks["hellaswag"] if e.example_id == "3505")
    assert "[" not in example.context
    assert "Visit a site like to find loads" in example.context


def test_preprocess_hellaswag_title():
    text = preprocess_hellaswag(" How to cook [title] Boil water. [step] Add salt. ")
    assert text == "How to cook. Boil water. Add salt."


def test_openbookqa_prompt(real_tasks):
    example = real_tasks["openbookqa"][0]
    assert example.example_id == "8-376"
    assert example.context == ("Frilled sharks and angler fish live far beneath the surface of the ocean, "
                               "which is why they are known as")
    assert example.choices[0] == " Deep sea animals"
    assert example.gold == 0


def test_piqa_prompt(real_tasks):
    example = real_tasks["piqa"][1]
    assert example.context == "Question: dresser\nAnswer:"
    assert example.choices == (" replace drawer with bobby pin", " finish, woodgrain with  bobby pin")
    assert example.gold == 1


def test_siqa_prompt(real_tasks):
    example = real_tasks["siqa"][0]
    assert example.context == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                               "What does Tracy need to do before this?\nA:")
    assert example.choices == (" make a new plan", " Go home and see Riley", " Find somewhere to go")
    assert example.gold == 2


def test_siqa_repeated_records_unique_ids(real_tasks):
    ids = [example.example_id for example in real_tasks["siqa"]]
    suffixed = [example_id for example_id in ids if "-" in example_id]
    assert len(suffixed) == 19
    assert all(example_id.split("-")[0] in ids for example_id in suffixed)


def test_winogrande_partial_scoring(real_tasks):
    example = real_tasks["winogrande"][0]
    assert example.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria")
    assert example.choices == (" always got the easier cases.", " always got the easier cases.")
    assert example.context == "Sarah was a much better surgeon than Maria so "
    assert example.gold == 1
    assert example.context_for(0) == example.contexts[0]
    assert example.gold_pair == ("Sarah was a much better surgeon than Maria so Maria",
                                 " always got the easier cases.")


def test_arc_numeric_answer_keys(tmp_path):
    records = [
        {"id": "q1", "question": "Q1", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]},
         "answerKey": "3"},
        {"id": "q2", "question": "Q2", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
         "answerKey": "2"},
    ]
    examples = load_task("arc_challenge", _write_jsonl(tmp_path / "arc.jsonl", records))
    assert [example.gold for example in examples] == [2, 1]


def test_arc_unknown_answer_key(tmp_path):
    records = [{"id": "q", "question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}]
    uri = _write_jsonl(tmp_path / "arc.jsonl", records)
    with pytest.raises(TaskError, match=r"arc\.jsonl line 1: answerKey 'E'"):
        load_task("arc_easy", uri)


def test_generic_format_gz(tmp_path):
    records = [_generic(0, gold=1), {"context": "No id:", "choices": [" x", " y", " z"], "gold": 2}]
    examples = load_task("my_task", _write_jsonl(tmp_path / "mine.jsonl.gz", records))
    assert [example.example_id for example in examples][0] == "ex-0"
    assert len(examples[1].example_id) == 16
    assert examples[1].choices == (" x", " y", " z")
    assert examples[1].gold == 2
    assert examples[0].task == "my_task"


def test_generic_format_contexts(tmp_path):
    record = {"id": "w", "context": "A ", "contexts": ["A cat", "A dog"], "choices": [" runs", " runs"], "gold": 0}
    example = load_task("fill", _write_jsonl(tmp_path / "fill.jsonl", [record]))[0]
    assert example.context_for(1) == "A dog"


@pytest.mark.parametrize(
    ("records", "raw_lines", "pattern"),
    [
        ([_generic(0)], ["{not json"], r"bad\.jsonl line 2: invalid JSON"),
        ([_generic(0), _generic(1, gold=2)], [], r"bad\.jsonl line 2: gold label 2 is out of range for 2 choices"),
        ([_generic(0, choices=(" only",))], [], r"bad\.jsonl line 1: an example needs at least 2 choices"),
        ([_generic(0, choices=())], [], r"bad\.jsonl line 1: an example needs at least 2 choices"),
        ([_generic(0), _generic(1), _generic(0)], [], r"bad\.jsonl line 3: example id 'ex-0' repeats line 1"),
        ([{"id": "x", "choices": [" a", " b"], "gold": 0}], [], r"bad\.jsonl line 1: missing field 'context'"),
        ([_generic(0, choices=(" a", ""))], [], r"bad\.jsonl line 1: choice 1 is ''"),
        ([], ["[1, 2]"], r"bad\.jsonl line 1: expected a JSON object"),
    ],
    ids=["malformed", "gold_range", "one_choice", "no_choices", "duplicate_id", "missing_field", "empty_choice",
         "not_object"],
)
def test_bad_file_errors(tmp_path, records, raw_lines, pattern):
    uri = _write_jsonl(tmp_path / "bad.jsonl", records, raw_lines=raw_lines)
    with pytest.raises(TaskError, match=pattern):
        load_task("custom", uri)


def test_bad_benchmark_record(tmp_path):
    uri = _write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(TaskError, match=r"piqa\.jsonl line 1: missing field 'sol2'; a piqa record needs"):
        load_task("piqa", uri)


def test_missing_file(tmp_path):
    with pytest.raises(TaskError, match=r"absent\.jsonl not found"):
        load_task("boolq", str(tmp_path / "absent.jsonl"))


def test_wrong_extension(tmp_path):
    path = tmp_path / "tasks.csv"
    path.write_text("a,b\n")
    with pytest.raises(TaskError, match=r"tasks\.csv is not JSONL"):
        load_task("boolq", str(path))


def test_split_disjoint_and_deterministic(real_tasks):
    examples = real_tasks["hellaswag"]
    influence, held_out = split_examples(examples, influence_fraction=0.5, seed=0)
    again_influence, again_held_out = split_examples(examples, influence_fraction=0.5, seed=0)
    influence_ids = {example.example_id for example in influence}
    held_out_ids = {example.example_id for example in held_out}
    assert not influence_ids & held_out_ids
    assert len(influence) + len(held_out) == len(examples)
    assert influence == again_influence
    assert held_out == again_held_out
    assert 0.47 < len(influence) / len(examples) < 0.53


def test_split_depends_on_seed(real_tasks):
    examples = real_tasks["piqa"]
    first, _ = split_examples(examples, influence_fraction=0.5, seed=0)
    second, _ = split_examples(examples, influence_fraction=0.5, seed=1)
    assert {e.example_id for e in first} != {e.example_id for e in second}


def test_split_stable_when_appending(tmp_path):
    path = tmp_path / "grow.jsonl"
    before = load_task("grow", _write_jsonl(path, [_generic(i) for i in range(200)]))
    after = load_task("grow", _write_jsonl(path, [_generic(i) for i in range(300)]))
    old_influence, _ = split_examples(before, influence_fraction=0.3, seed=7)
    new_influence, _ = split_examples(after, influence_fraction=0.3, seed=7)
    old_ids = {example.example_id for example in before}
    assert {e.example_id for e in new_influence if e.example_id in old_ids} == {e.example_id for e in old_influence}


def test_split_fraction_one_keeps_all(real_tasks):
    influence, held_out = split_examples(real_tasks["openbookqa"], influence_fraction=1.0, seed=0)
    assert len(influence) == 500
    assert held_out == []


def test_limit_examples(real_tasks):
    examples = real_tasks["boolq"]
    limited = limit_examples(examples, 100, seed=3)
    positions = [examples.index(example) for example in limited]
    assert len(limited) == 100
    assert positions == sorted(positions)
    assert limited == limit_examples(examples, 100, seed=3)
    assert limited != limit_examples(examples, 100, seed=4)
    assert limit_examples(examples, None, seed=3) == examples
    assert limit_examples(examples[:10], 50, seed=3) == examples[:10]


def test_prepare_task_splits(shared_data, tmp_path):
    extra = _write_jsonl(tmp_path / "extra.jsonl", [_generic(i) for i in range(40)])
    config = TasksConfig(root=str(shared_data / "tasks"), names=["boolq", "winogrande", "extra"],
                         files={"extra": extra}, influence_fraction=0.5, seed=0, max_influence_examples=64)
    splits = prepare_task_splits(config)
    assert list(splits.influence) == ["boolq", "winogrande", "extra"]
    assert len(splits.influence["boolq"]) == 64
    assert len(splits.influence["winogrande"]) == 64
    assert len(splits.eval["boolq"]) > 1500
    assert len(splits.influence["extra"]) + len(splits.eval["extra"]) == 40
    for name in splits.influence:
        influence_ids = {example.example_id for example in splits.influence[name]}
        assert not influence_ids & {example.example_id for example in splits.eval[name]}


def test_load_tasks_missing_name(tmp_path):
    config = TasksConfig(files={"a": _write_jsonl(tmp_path / "a.jsonl", [_generic(0)])}, names=["a", "b"])
    with pytest.raises(TaskError, match=r"no file found for tasks \['b'\]"):
        load_tasks(config)


def test_example_checks_contexts():
    with pytest.raises(ValueError, match="3 contexts for 2 choices"):
        Example(task="t", example_id="1", context="", choices=(" a", " b"), gold=0, contexts=("x", "y", "z"))
