"""Benchmark tasks as multiple-choice examples, and the seeded influence/eval split.

Each benchmark file becomes a list of :class:`Example` with the zero-shot prompt format that
lm-evaluation-harness (EleutherAI) uses for that task. The context is the harness's
``doc_to_text``. Each choice is the harness's ``doc_to_choice`` entry with the default target
delimiter (one space) already in front of it. Unknown task names read the generic
multiple-choice JSONL format described in docs/TASKS.md.

AutoMixer (Chang et al., ACL 2025, arXiv 2506.21910) picks a checkpoint per benchmark and then
uses the same benchmark's examples for task gradients. This module therefore splits each task
once, by a seeded hash of each example, into an influence split V_t (checkpoint selection and
task gradients) and a held-out eval split E_t (judging mixtures only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import fsspec

from automixer_ray.config import TasksConfig

logger = logging.getLogger(__name__)

# The benchmarks with a built-in loader, in the order tables list them.
KNOWN_TASKS = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "openbookqa",
    "piqa",
    "siqa",
    "winogrande",
)
# Files looked for in each benchmark folder, best first.
TASK_FILE_NAMES = ("validation.jsonl", "validation.jsonl.gz", "test.jsonl", "test.jsonl.gz")
TASK_FILE_SUFFIXES = (".jsonl", ".jsonl.gz")


class TaskError(ValueError):
    """A task file or task folder that is missing or cannot be read as examples."""


@dataclass(frozen=True, kw_only=True)
class Example:
    """One multiple-choice example: a prompt and the continuation strings to score.

    The scored text of choice ``i`` is ``context_for(i) + choices[i]``, joined without a
    separator, and only the ``choices[i]`` part is scored. ``contexts`` is set for partial
    scoring (WinoGrande), where each choice has its own context and all choices share one
    continuation. Then ``context`` is the text before the blank and is never scored against.
    """

    task: str
    example_id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    contexts: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.choices, tuple) or len(self.choices) < 2:
            raise ValueError(f"an example needs at least 2 choices, got {list(self.choices)!r}")
        for index, choice in enumerate(self.choices):
            if not isinstance(choice, str) or not choice:
                raise ValueError(f"choice {index} is {choice!r}; every choice must be a non-empty string")
        if isinstance(self.gold, bool) or not isinstance(self.gold, int):
            raise ValueError(f"gold label {self.gold!r} is not an integer choice index")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold label {self.gold} is out of range for {len(self.choices)} choices; "
                             f"use a 0-based index from 0 to {len(self.choices) - 1}")
        if not isinstance(self.context, str):
            raise ValueError(f"context {self.context!r} is not a string")
        if self.contexts is not None:
            if len(self.contexts) != len(self.choices):
                raise ValueError(f"{len(self.contexts)} contexts for {len(self.choices)} choices; "
                                 "give one context per choice or none")
            if not all(isinstance(text, str) for text in self.contexts):
                raise ValueError(f"contexts {list(self.contexts)!r} must all be strings")

    def context_for(self, choice: int) -> str:
        """Return the context that choice ``choice`` continues."""
        return self.contexts[choice] if self.contexts is not None else self.context

    @property
    def gold_pair(self) -> tuple[str, str]:
        """The gold choice's (context, continuation): the text a task gradient is taken on."""
        return self.context_for(self.gold), self.choices[self.gold]


@dataclass
class TaskSplits:
    """Per-task influence split V_t and held-out eval split E_t."""

    influence: dict[str, list[Example]] = field(default_factory=dict)
    eval: dict[str, list[Example]] = field(default_factory=dict)


# ---------------------------------------------------------------- per-benchmark prompt formats
# Each parser takes one JSON record and returns (context, choices, gold, contexts or None).
# A KeyError, TypeError or ValueError from a parser becomes a TaskError naming file and line.

ParsedRecord = tuple[str, list[str], int, Optional[list[str]]]


def _lettered_gold(record: dict) -> int:
    """Map ARC/OpenBookQA ``answerKey`` to an index; keys may be letters or digits "1".."5"."""
    labels = [str(label).strip() for label in record["choices"]["label"]]
    key = str(record["answerKey"]).strip()
    if key in labels:
        return labels.index(key)
    if key.isdigit() and all(label.isalpha() for label in labels):
        return int(key) - 1
    if key.isalpha() and len(key) == 1 and all(label.isdigit() for label in labels):
        return ord(key.upper()) - ord("A")
    raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")


def _parse_arc(record: dict) -> ParsedRecord:
    context = f"Question: {record['question']}\nAnswer:"
    return context, [" " + text for text in record["choices"]["text"]], _lettered_gold(record), None


def _parse_openbookqa(record: dict) -> ParsedRecord:
    return record["question_stem"], [" " + text for text in record["choices"]["text"]], _lettered_gold(record), None


def _parse_boolq(record: dict) -> ParsedRecord:
    # The HF boolq schema has a bool "answer"; the super_glue schema has a 0/1 "label".
    answer = record["answer"] if "answer" in record else record["label"]
    if isinstance(answer, str) and answer.lower() in ("true", "false"):
        answer = answer.lower() == "true"
    if answer not in (True, False, 0, 1):
        raise ValueError(f"field 'answer' is {answer!r}, not a boolean")
    # The harness appends "?" to the HF question, which has none. Some copies of BoolQ already
    # end in "?", so one trailing "?" is dropped first to give the harness's prompt.
    question = record["question"].rstrip()
    question = question[:-1] if question.endswith("?") else question
    context = f"{record['passage']}\nQuestion: {question}?\nAnswer:"
    return context, [" no", " yes"], int(bool(answer)), None


def preprocess_hellaswag(text: str) -> str:
    """Clean HellaSwag text as lm-evaluation-harness does (WikiHow bracket artifacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    text = text.replace("  ", " ")
    return text


def _parse_hellaswag(record: dict) -> ParsedRecord:
    context = preprocess_hellaswag(record["activity_label"] + ": " + record["ctx_a"] + " "
                                   + record["ctx_b"].capitalize())
    choices = [" " + preprocess_hellaswag(ending) for ending in record["endings"]]
    return context, choices, int(record["label"]), None


def _parse_piqa(record: dict) -> ParsedRecord:
    return f"Question: {record['goal']}\nAnswer:", [" " + record["sol1"], " " + record["sol2"]], int(record["label"]), None


def _parse_siqa(record: dict) -> ParsedRecord:
    context = f"Q: {record['context']} {record['question']}\nA:"
    choices = [" " + record["answerA"], " " + record["answerB"], " " + record["answerC"]]
    return context, choices, int(record["label"]) - 1, None


def _parse_winogrande(record: dict) -> ParsedRecord:
    # Partial scoring (Trinh and Le, 2018): each option fills the blank in its own context, and
    # only the text after the blank, the same for both options, is scored.
    sentence = record["sentence"]
    if "_" not in sentence:
        raise ValueError(f"sentence {sentence!r} has no blank '_'")
    blank = sentence.index("_")
    contexts = [sentence[:blank] + record["option1"], sentence[:blank] + record["option2"]]
    continuation = " " + sentence[blank + 1:].strip()
    answer = str(record["answer"]).strip()
    if answer not in ("1", "2"):
        raise ValueError(f"field 'answer' is {answer!r}, not '1' or '2'")
    return sentence[:blank], [continuation, continuation], int(answer) - 1, contexts


def _parse_generic(record: dict) -> ParsedRecord:
    for key in ("context", "choices", "gold"):
        if key not in record:
            raise KeyError(key)
    choices = record["choices"]
    if not isinstance(choices, list):
        raise ValueError(f"choices must be a list of strings, got {choices!r}")
    contexts = record.get("contexts")
    if contexts is not None and not isinstance(contexts, list):
        raise ValueError(f"contexts must be a list of strings or absent, got {contexts!r}")
    return record["context"], choices, record["gold"], contexts


@dataclass(frozen=True)
class _TaskFormat:
    parse: Callable[[dict], ParsedRecord]
    # The record field that contains the example id; None hashes the record.
    id_field: Optional[str]
    fields: str


_FORMATS: dict[str, _TaskFormat] = {
    "arc_easy": _TaskFormat(_parse_arc, "id", "id, question, choices{text,label}, answerKey"),
    "arc_challenge": _TaskFormat(_parse_arc, "id", "id, question, choices{text,label}, answerKey"),
    "boolq": _TaskFormat(_parse_boolq, None, "question, passage, answer (bool)"),
    "hellaswag": _TaskFormat(_parse_hellaswag, "ind", "ind, activity_label, ctx_a, ctx_b, endings, label"),
    "openbookqa": _TaskFormat(_parse_openbookqa, "id", "id, question_stem, choices{text,label}, answerKey"),
    "piqa": _TaskFormat(_parse_piqa, None, "goal, sol1, sol2, label (0/1)"),
    "siqa": _TaskFormat(_parse_siqa, None, "context, question, answerA, answerB, answerC, label ('1'..'3')"),
    "winogrande": _TaskFormat(_parse_winogrande, None, "sentence (with '_'), option1, option2, answer ('1'/'2')"),
}
_GENERIC_FORMAT = _TaskFormat(_parse_generic, "id", 'id (optional), context, choices (list), gold (int)')


# ---------------------------------------------------------------- reading files


def record_hash(record: dict) -> str:
    """Return 16 hex digits of BLAKE2b over the record's canonical JSON (sorted keys, UTF-8)."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def _read_records(uri: str) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, record) for every non-blank line of a JSONL(.gz) file."""
    if not uri.endswith(TASK_FILE_SUFFIXES):
        raise TaskError(f"task file {uri} is not JSONL; give a .jsonl or .jsonl.gz file")
    try:
        with fsspec.open(uri, "rt", compression="infer", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise TaskError(f"{uri} line {line_number}: invalid JSON ({error.msg} at column "
                                    f"{error.colno}); write one JSON object per line") from error
                if not isinstance(record, dict):
                    raise TaskError(f"{uri} line {line_number}: expected a JSON object, got "
                                    f"{type(record).__name__}; write one JSON object per line")
                yield line_number, record
    except FileNotFoundError as error:
        raise TaskError(f"task file {uri} not found; check the path or the tasks root folder") from error
    except UnicodeDecodeError as error:
        raise TaskError(f"task file {uri} is not valid UTF-8 ({error}); re-encode it as UTF-8") from error


def _build_example(name: str, fmt: _TaskFormat, uri: str, line_number: int, record: dict,
                   example_id: str) -> Example:
    where = f"{uri} line {line_number}"
    try:
        context, choices, gold, contexts = fmt.parse(record)
    except KeyError as error:
        raise TaskError(f"{where}: missing field {error}; a {name} record needs {fmt.fields}") from error
    except (TypeError, ValueError, AttributeError) as error:
        raise TaskError(f"{where}: {error}; a {name} record needs {fmt.fields}") from error
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    try:
        return Example(task=name, example_id=example_id, context=context, choices=tuple(choices),
                       gold=gold, contexts=tuple(contexts) if contexts is not None else None)
    except ValueError as error:
        raise TaskError(f"{where}: {error}") from error


def load_task(name: str, uri: str) -> list[Example]:
    """Read one task file (JSONL or JSONL.gz, any fsspec URI) into examples, in file order.

    Known benchmarks use their own schema and prompt format; any other name reads the generic
    format. The example id is the record's id field where the format has one, else
    :func:`record_hash`. Identical records without an id field get ``-2``, ``-3``, ... after the
    hash for their second and later copies, so ids stay unique and do not move when records are
    appended. Raises :class:`TaskError` naming the file and line for any bad record or
    repeated id.
    """
    fmt = _FORMATS.get(name, _GENERIC_FORMAT)
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    hash_copies: dict[str, int] = {}
    for line_number, record in _read_records(uri):
        raw_id = record.get(fmt.id_field) if fmt.id_field else None
        if raw_id is not None and str(raw_id) != "":
            example_id = str(raw_id)
        else:
            digest = record_hash(record)
            hash_copies[digest] = hash_copies.get(digest, 0) + 1
            copies = hash_copies[digest]
            example_id = digest if copies == 1 else f"{digest}-{copies}"
        if example_id in first_line:
            raise TaskError(f"{uri} line {line_number}: example id {example_id!r} repeats line "
                            f"{first_line[example_id]}; give every example a distinct id")
        first_line[example_id] = line_number
        examples.append(_build_example(name, fmt, uri, line_number, record, example_id))
    if not examples:
        raise TaskError(f"task file {uri} has no examples; it must hold one JSON object per line")
    repeated = sum(count - 1 for count in hash_copies.values())
    if repeated:
        logger.warning("task %s: %s has %d repeated records; they are kept with suffixed ids", name, uri, repeated)
    logger.info("task %s: %d examples from %s%s", name, len(examples), uri,
                "" if name in _FORMATS else " (generic format)")
    return examples


def find_task_files(root: str, names: list[str]) -> dict[str, str]:
    """Map each task name to its file under ``root``, a folder with one subfolder per task.

    In each ``root/<name>/`` folder the first of validation.jsonl, validation.jsonl.gz,
    test.jsonl and test.jsonl.gz that exists is used. Empty ``names`` means every known
    benchmark found under ``root``. A requested name without a file raises :class:`TaskError`.
    """
    fs, root_path = fsspec.core.url_to_fs(root)
    if not fs.isdir(root_path):
        raise TaskError(f"tasks folder {root} not found; pass a folder with one subfolder per task")
    candidates = list(names) if names else list(KNOWN_TASKS)
    found: dict[str, str] = {}
    for name in candidates:
        for file_name in TASK_FILE_NAMES:
            if fs.isfile(posixpath.join(root_path, name, file_name)):
                found[name] = root.rstrip("/") + f"/{name}/{file_name}"
                break
        else:
            if names:
                raise TaskError(f"task {name!r} has no file under {root}; expected {root.rstrip('/')}/{name}/ "
                                f"with one of {', '.join(TASK_FILE_NAMES)}")
    if not found:
        raise TaskError(f"no benchmark files under {root}; expected subfolders named like "
                        f"{', '.join(KNOWN_TASKS)} with {TASK_FILE_NAMES[0]} or {TASK_FILE_NAMES[2]}")
    return found


def task_files(config: TasksConfig) -> dict[str, str]:
    """Resolve ``config`` to task name -> file: files under ``root``, then ``files`` on top."""
    requested = list(config.names)
    files: dict[str, str] = {}
    if config.root:
        from_root = [name for name in requested if name not in config.files]
        if from_root or not requested:
            files.update(find_task_files(config.root, from_root))
    files.update(config.files)
    if requested:
        missing = [name for name in requested if name not in files]
        if missing:
            raise TaskError(f"no file found for tasks {missing}; set tasks.root to a folder that "
                            "contains them or list them under tasks.files")
        files = {name: files[name] for name in requested}
    if not files:
        raise TaskError("no tasks configured; set tasks.root or tasks.files")
    return files


def load_tasks(config: TasksConfig) -> dict[str, list[Example]]:
    """Load every task that ``config`` names (``root`` plus ``files``), keyed by task name."""
    return {name: load_task(name, uri) for name, uri in task_files(config).items()}


# ---------------------------------------------------------------- split and subsample


def _unit_hash(*parts: Any) -> float:
    """Map ``parts`` to a float in [0, 1) with BLAKE2b; equal parts give equal floats."""
    text = "\x1f".join(str(part) for part in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_examples(examples: Iterable[Example], *, influence_fraction: float,
                   seed: int) -> tuple[list[Example], list[Example]]:
    """Split examples into (influence V_t, eval E_t) by a seeded hash of (seed, task, example_id).

    Each example's side depends only on its own id, so the split is deterministic, disjoint,
    and unchanged for old examples when new ones are added. Both lists keep the input order.
    """
    if not 0.0 < influence_fraction <= 1.0:
        raise ValueError(f"influence_fraction={influence_fraction} is out of range; allowed: (0, 1]")
    influence: list[Example] = []
    held_out: list[Example] = []
    for example in examples:
        if _unit_hash("split", seed, example.task, example.example_id) < influence_fraction:
            influence.append(example)
        else:
            held_out.append(example)
    return influence, held_out


def limit_examples(examples: Iterable[Example], max_count: Optional[int], *, seed: int) -> list[Example]:
    """Keep at most ``max_count`` examples, chosen by a seeded hash of the id, in input order."""
    examples = list(examples)
    if max_count is not None and max_count < 1:
        raise ValueError(f"max_count={max_count} is invalid; use a count >= 1 or None to keep all")
    if max_count is None or len(examples) <= max_count:
        return examples
    ranked = sorted(range(len(examples)),
                    key=lambda i: _unit_hash("limit", seed, examples[i].task, examples[i].example_id))
    kept = sorted(ranked[:max_count])
    return [examples[i] for i in kept]


def prepare_task_splits(config: TasksConfig) -> TaskSplits:
    """Load the tasks, split each, and cap the influence split at ``max_influence_examples``."""
    splits = TaskSplits()
    for name, examples in load_tasks(config).items():
        influence, held_out = split_examples(examples, influence_fraction=config.influence_fraction,
                                             seed=config.seed)
        limited = limit_examples(influence, config.max_influence_examples, seed=config.seed)
        if not limited:
            logger.warning("task %s: the influence split is empty (%d examples, fraction %.2f); "
                           "raise tasks.influence_fraction or add examples",
                           name, len(examples), config.influence_fraction)
        splits.influence[name] = limited
        splits.eval[name] = held_out
        logger.info("task %s: %d examples -> influence %d (of %d in the split), eval %d",
                    name, len(examples), len(limited), len(influence), len(held_out))
    return splits
