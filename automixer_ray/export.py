"""Export a manifest's group weights in the forms other training stacks read.

- ``hf-interleave``: a JSON file with the group files and ``probabilities`` for Hugging Face
  ``datasets.interleave_datasets``, plus a usage snippet.
- ``megatron``: a JSON file with the weighted blend list ``[w1, prefix1, w2, prefix2, ...]``
  that Megatron-LM's ``--data-path`` takes (``megatron.core.datasets.utils.get_blend_from_list``
  reads the same flattened weight/prefix list).

Group files hold sample locations and never the text, so both targets need one step on the
user's side. The snippet in the hf-interleave file shows how to read the text back. For Megatron,
each group's text must first be turned into an indexed dataset (``.bin`` and ``.idx``) with
Megatron-LM's ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from automixer_ray.manifest import atomic_output, group_file_uri, read_manifest, resolve_manifest_uri

logger = logging.getLogger(__name__)

ExportFormat = Literal["hf-interleave", "megatron"]
FORMATS = ("hf-interleave", "megatron")
# tools/preprocess_data.py names its output {output_prefix}_{json_key}_document for document-level
# indexing, so a group preprocessed with --output-prefix <group file without .parquet> and the
# default json key "text" is found under this suffix.
MEGATRON_PREFIX_SUFFIX = "_text_document"

HF_USAGE = [
    "import json",
    "from datasets import interleave_datasets, load_dataset",
    "from automixer_ray.corpus import read_record_text",
    "spec = json.load(open(SPEC_PATH))",
    "groups = [load_dataset('parquet', data_files=f, split='train') for f in spec['data_files']]",
    "mixed = interleave_datasets(groups, probabilities=spec['probabilities'], seed=0,",
    "                            stopping_strategy=spec['stopping_strategy'])",
    "# Rows hold locations, not text; read each sample's text back from the raw corpus:",
    "mixed = mixed.map(lambda r: {'text': read_record_text(r['uri'], r['row'], text_field=spec['text_field'],",
    "                  decode_errors=spec['decode_errors'])[r['char_start']:r['char_end']]})",
]


def _probabilities(manifest: dict[str, Any]) -> list[float]:
    # The manifest's weights sum to 1 within 1e-6; renormalise so numpy's choice(p=...) accepts them.
    weights = [float(group["weight"]) for group in manifest["groups"]]
    total = sum(weights)
    return [weight / total for weight in weights]


def hf_interleave_spec(manifest_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Return the hf-interleave document: group files, probabilities and a usage snippet."""
    corpus = manifest["config"].get("corpus", {})
    return {
        "format": "hf-interleave",
        "manifest": manifest_uri,
        "config_fingerprint": manifest["config_fingerprint"],
        "groups": [group["name"] for group in manifest["groups"]],
        "data_files": [group_file_uri(manifest_uri, group) for group in manifest["groups"]],
        "probabilities": _probabilities(manifest),
        # Keep drawing until every group has been seen whole, so small groups repeat (their epochs).
        "stopping_strategy": "all_exhausted",
        "text_field": corpus.get("text_field", "text"),
        "decode_errors": corpus.get("decode_errors", "replace"),
        "usage": HF_USAGE,
    }


def megatron_spec(manifest_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Return the megatron document: the flattened blend list and the same as one argument string."""
    blend: list[Any] = []
    for group, weight in zip(manifest["groups"], _probabilities(manifest)):
        uri = group_file_uri(manifest_uri, group)
        prefix = uri[: -len(".parquet")] if uri.endswith(".parquet") else uri
        blend += [weight, prefix + MEGATRON_PREFIX_SUFFIX]
    return {
        "format": "megatron",
        "manifest": manifest_uri,
        "config_fingerprint": manifest["config_fingerprint"],
        "data_path": blend,
        "data_path_arg": " ".join(f"{item:.10g}" if isinstance(item, float) else item for item in blend),
        "note": ("Each prefix names an indexed dataset (prefix.bin, prefix.idx) that Megatron-LM's "
                 "tools/preprocess_data.py writes with --output-prefix <group file without .parquet> "
                 "and --json-keys text, from a JSONL of the group's texts in rank order. Pass "
                 "data_path_arg to --data-path."),
    }


def export_manifest(manifest_uri: str, *, format: ExportFormat, output: str) -> str:
    """Write the manifest's mixture to ``output`` in ``format`` (a JSON file); return ``output``."""
    if format not in FORMATS:
        raise ValueError(f"export format {format!r} is invalid; allowed: {', '.join(FORMATS)}")
    manifest_uri = resolve_manifest_uri(manifest_uri)
    manifest = read_manifest(manifest_uri)
    spec = hf_interleave_spec(manifest_uri, manifest) if format == "hf-interleave" else megatron_spec(manifest_uri, manifest)
    with atomic_output(output) as handle:
        handle.write(json.dumps(spec, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    logger.info("exported %d group(s) of %s as %s to %s", len(manifest["groups"]), manifest_uri, format, output)
    return output
