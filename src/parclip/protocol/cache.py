"""Stage caching: a stage's record is reused when it was computed for the same spec, recomputed otherwise.

A spec is the full configuration of a stage (the non-default values of its TrainConfig/PatchConfig, the key of the
stage it starts from, how it is measured). A stage whose record holds the same spec is reused; one whose spec
changed is recomputed, its run folder wiped first; a killed training resumes from its checkpoint (its run folder's
spec.json still matches).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from parclip.utils.files import write_json

from .settings import NOT_IN_SPEC


def canonical(obj) -> object:
    """JSON-normalised copy (tuples → lists, paths → strings), so that specs compare equal after a round trip."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def key_of(spec) -> str:
    """A short, stable name of a spec: the first 16 hex digits of the SHA-256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(canonical(spec), sort_keys=True).encode()).hexdigest()[:16]


def cached(json_path: Path, spec: dict, compute, run_dir: Path | None = None) -> dict:
    """The record in `json_path` if it was computed for `spec`; else compute() it (a dict) and write it.

    A `run_dir` computed for another spec (its spec.json differs) is wiped first; one with the same spec is left
    alone, so a killed training resumes from its checkpoint."""
    spec = canonical(spec)
    if json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("spec") == spec:
            return old
    if run_dir is not None:
        spec_file = run_dir / "spec.json"
        if run_dir.exists() and (not spec_file.is_file() or json.loads(spec_file.read_text()) != spec):
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(spec_file, spec)
    t0 = time.time()
    record = {"spec": spec, "key": key_of(spec), **compute(), "seconds": round(time.time() - t0, 1)}
    write_json(json_path, record)
    return record


def config_spec(cfg) -> dict:
    """The values of a TrainConfig/PatchConfig that differ from the class defaults (minus NOT_IN_SPEC): what the
    protocol asked for, so that a field added to TrainConfig later (with a default) does not invalidate the cache."""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_SPEC and v != default[k]}
