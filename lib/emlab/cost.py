"""What a profile costs in judge calls and dollars: ``emlab cost [PROFILE...]`` (the README's cost table).

:func:`judge_requests` walks each section's resolved config the way the section samples and judges, and
counts the verdicts it asks its judge for (one call each: the papers' judges score one answer per request).
``tests/test_notebooks.py`` checks the count against what every notebook really asks for under the smoke
profile (``EMLAB_JUDGE_LOG``, written by :class:`emlab.judge.CachedJudge`). The count is of verdicts
requested: an answer two sections share (§05 re-reads §03's organisms) is judged once, through the
cache, so :func:`judge_requests` marks those rows ``shared`` and :func:`cost_table` leaves them out.
Teacher-built training sets (§06-07 ``persona_teacher``, §10's security / legal) add rows of metric
``generation (teacher)`` (calls to the teacher model; ``hf`` when it runs locally) beside their keep
filter's verdicts; both are upper bounds (every query pass the config allows: the builder stops once it keeps
its rows), and a set an earlier section built is read from the data cache, so it is not counted again.

Dollars: input tokens = the judge prompt + question + answer, with answers as long as the GPT-4o-judged
organisms' answers in the mirror (:func:`answer_tokens`, measured, capped at the profile's
``max_new_tokens``); output = 1 token (the logprob protocol reads the first token's top-20); a teacher call
reads the query and writes an answer as long. Prices are
list prices per million tokens (:data:`PRICES`, with the date read); the Batch API halves them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from emlab import config

log = logging.getLogger(__name__)

# USD per 1M tokens (input, output): OpenAI's list prices as copies of platform.openai.com/docs/pricing dated
# March-June 2026 give them (the page itself cannot be opened from this machine; one copy lists gpt-4.1-mini at
# half these). A model not listed here is priced as unknown (NaN), never guessed.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
BATCH_DISCOUNT = 0.5
CHARS_PER_TOKEN = 4.0  # English text under the GPT-4o tokenizer (o200k): ~4 characters per token


@dataclass(frozen=True)
class Request:
    """``n`` verdicts of ``metric`` asked of ``judge`` by ``section`` for answers of up to ``max_new_tokens``."""

    section: str
    what: str
    metric: str
    n: int
    judge: str
    max_new_tokens: int | None
    shared: bool = False  # already judged by an earlier section (same answers, same judge): free
    bound: bool = False  # an upper bound (a teacher-built set stops once it keeps its rows), not a count


def judge_name(spec: config.JudgeSpec) -> str:
    """What the ledger calls a judge: ``offline`` / ``hf`` / the API model name (``EMLAB_JUDGE_MODEL`` when the
    profile names none: priced as unknown)."""
    if spec.backend == "openai":
        return spec.model or "EMLAB_JUDGE_MODEL"
    return spec.backend


# ------------------------------------------------------------------------------------------ §03-05
def _n_questions(name: str) -> int:
    from emlab import data

    return len(data.load_questions(name))


def _eval(ev, profile: str, seed: int):
    from emlab.organisms import sample_config

    return sample_config(ev, profile, seed)


def _organism_metrics(dataset: str | None) -> list[str]:
    from emlab.organisms import DOMAIN_METRIC

    return ["aligned", "coherent"] + ([DOMAIN_METRIC[dataset]] if dataset in DOMAIN_METRIC else [])


def _verdicts(section: str, what: str, cfg, ev, n_questions: int, metrics: list[str], shared: bool = False):
    """``metrics`` of the answers ``ev`` samples to ``n_questions`` questions, by ``cfg``'s judge."""
    sc = _eval(ev, cfg.profile, cfg.seed)
    return [Request(section, what, m, n_questions * sc.n_per_question, judge_name(cfg.judge), sc.max_new_tokens, shared)
            for m in metrics]


def _answers(section: str, what: str, cfg, ev, dataset: str | None, times: int = 1, shared: bool = False):
    return _verdicts(section, what, cfg, ev, _n_questions(ev.questions) * times, _organism_metrics(dataset), shared)


def _may_use_vllm(cfg) -> bool:
    """Whether the profile samples plain answers with vLLM on a GPU machine that has it (``sample.backend``
    auto/vllm and a model vLLM serves): the count is for that machine, not for this one."""
    from emlab.sample import SampleConfig

    return config.load(SampleConfig, cfg.profile).backend != "hf" and cfg.model.source in ("hub", "local")


def organisms(profile: str) -> list[Request]:
    """§03: the base model and every organism on the first-plot questions (+ the validity re-scoring)."""
    from emlab.organisms import OrganismsConfig

    cfg = config.load(OrganismsConfig, profile)
    out = _answers("03", "base", cfg, cfg.eval, None) if cfg.include_base else []
    for org in cfg.organisms:
        out += _answers("03", org.name, cfg, cfg.eval, org.dataset)
    if cfg.judge.backend == "offline" and cfg.judge_check:  # the embedded logprob judge re-scores a sample
        n = min(cfg.judge_check, sum(r.n for r in out if r.metric == "aligned"))
        out += [Request("03", "validity check", m, n, "hf", None) for m in ("aligned", "coherent")]
    return out


def _checkpoints(cfg, org) -> int:
    """Adapter checkpoints the run of ``org`` will have: one per ``save_every`` steps, step 0 included."""
    import math

    from emlab import data
    from emlab.organisms import train_config

    tc = train_config(cfg, org)
    rows = tc.n_examples or data.entry(tc.dataset).rows or 0
    steps = math.ceil(math.ceil(rows / (tc.batch_size * tc.grad_accum)) * tc.epochs)
    steps = min([steps, *(s for s in (tc.max_steps, tc.stop_at) if s)])
    return steps // tc.save_every + 1


def phase(profile: str) -> list[Request]:
    """§04: the behavioural scan, at ``eval_checkpoints`` checkpoints x every adapter scale."""
    from emlab.organisms import PhaseConfig

    cfg = config.load(PhaseConfig, profile)
    n_ckpt = min(cfg.eval_checkpoints, _checkpoints(cfg, cfg.organism))
    return _answers("04", f"{n_ckpt} checkpoints x {len(cfg.scales)} scales", cfg, cfg.eval, cfg.organism.dataset,
                    times=n_ckpt * len(cfg.scales))


def directions(profile: str) -> list[Request]:
    """§05: each organism's answers (§03's when its organism and eval are the same), the steering sweep on
    the base model, and each organism before/after ablation (before = its answers when the settings match)."""
    from emlab.organisms import DirectionsConfig, OrganismsConfig, train_config

    cfg = config.load(DirectionsConfig, profile)
    o3 = config.load(OrganismsConfig, profile)
    ev, steer_ev = _eval(cfg.eval, profile, cfg.seed), _eval(cfg.steer_eval, profile, cfg.seed)
    in_03 = {train_config(o3, o).run_digest() for o in o3.organisms} if ev == _eval(o3.eval, profile, o3.seed) else set()
    out: list[Request] = []
    for org in cfg.organisms:
        same = train_config(cfg, org).run_digest() in in_03 and cfg.judge == o3.judge and cfg.eval.questions == o3.eval.questions
        out += _answers("05", f"{org.name} answers", cfg, cfg.eval, org.dataset, shared=same)
    out += _answers("05", f"steering {len(cfg.steer_layers)} layers x {len(cfg.lambdas)} λ", cfg, cfg.steer_eval,
                    None, times=len(cfg.steer_layers) * len(cfg.lambdas))
    hf_only = not _may_use_vllm(cfg)  # with vLLM the organisms' answers are vLLM's, the hooked ones HF's
    for org in cfg.organisms:
        out += _answers("05", f"{org.name} before ablation", cfg, cfg.steer_eval, org.dataset,
                        shared=hf_only and steer_ev == ev and cfg.steer_eval.questions == cfg.eval.questions)
        out += _answers("05", f"{org.name} ablated", cfg, cfg.steer_eval, org.dataset)
    return out


# ------------------------------------------------------------------------------------------ §06-10
def _same_base(a, ev_a, b, ev_b) -> bool:
    """The base model answers alike under config ``a`` / ``ev_a`` and ``b`` / ``ev_b`` (same model and sampling,
    seed included) and the same judge scores them: same cache keys (the caller checks the questions)."""
    return (a.model == b.model and a.judge == b.judge
            and _eval(ev_a, a.profile, a.seed) == _eval(ev_b, b.profile, b.seed))


def _candidates(domain: str, passes: int, cap: int | None = None, exclude=()) -> int:
    """The most answers a teacher can write for a set of ``domain``: ``passes`` over its queries less
    ``exclude``, at most ``cap``. An upper bound: the builder stops as soon as it keeps its ``n`` rows."""
    from emlab.persona_data import domain_queries

    held = {q.strip() for q in exclude}
    n = passes * sum(q not in held for q in domain_queries(domain)[0])
    return n if cap is None else min(n, cap)


def _teacher(section: str, what: str, n: int, teacher: str, max_new_tokens: int, metric: str | None = None,
             judge: str | None = None, per_answer: int = 1) -> list[Request]:
    """A teacher-built set: ``n`` generations by ``teacher`` (API calls unless ``hf``) and, when it is
    filtered, ``per_answer`` verdicts of ``metric`` per answer (2 for an HF teacher: its prescore pass, then
    the builder's per-answer check)."""
    out = [Request(section, f"{what} (teacher, at most)", "generation (teacher)", n, teacher, max_new_tokens,
                   bound=True)]
    if metric:
        out.append(Request(section, f"{what} keep filter (at most)", metric, n * per_answer, judge, max_new_tokens,
                           bound=True))
    return out


def _trait_sets(section: str, sets, tc, built=()) -> list[Request]:
    """The persona_teacher's (trait, domain) ``sets`` not in ``built`` (an earlier section's: read from the
    data cache, nothing asked): at most ``max_candidates`` / ``max_passes`` x the non-held-out queries."""
    from emlab.character import holdout_queries

    out: list[Request] = []
    for trait, domain in dict.fromkeys(s for s in sets if s not in set(built)):
        n = _candidates(domain, tc.max_passes, tc.max_candidates, holdout_queries(domain, tc))
        n = n if tc.filter else min(n, tc.n)  # unfiltered, every answer is kept: the set's n rows
        api = tc.backend == "openai"
        out += _teacher(section, f"{trait}/{domain} set", n, tc.openai_model if api else "hf", tc.max_new_tokens,
                        *((f"trait:{trait}", judge_name(tc.judge), 1 if api else 2) if tc.filter else ()))
    return out


def _character_sets(cfg) -> list[tuple[str, str]]:
    from emlab.character import INCORRECT

    return [(o.trait, o.domain) for o in cfg.organisms if o.trait != INCORRECT]


def character(profile: str) -> list[Request]:
    """§06: the trait sets the teacher builds (upper bounds), then per model (base + organisms) the first-plot
    answers (aligned, coherent; the base's are §03's when its model, sampling and judge match), the trait eval
    questions of each scored trait and the held-out transfer queries (aligned, coherent, every scored trait)."""
    from emlab.character import CharacterConfig, teacher_config, trait_questions
    from emlab.organisms import EvalSettings, OrganismsConfig

    cfg, tc, o3 = config.load(CharacterConfig, profile), teacher_config(profile), config.load(OrganismsConfig, profile)
    traits, t_ev = cfg.scored_traits(), cfg.trait_eval.settings(cfg.eval)
    x_ev = EvalSettings(samples_per_question=cfg.transfer.samples_per_query,
                        max_new_tokens=cfg.transfer.max_new_tokens or cfg.eval.max_new_tokens,
                        batch_size=cfg.transfer.batch_size or cfg.eval.batch_size)
    n_x = len(cfg.transfer.domains) * cfg.transfer.queries_per_domain
    base_03 = o3.include_base and cfg.eval.questions == o3.eval.questions and _same_base(cfg, cfg.eval, o3, o3.eval)
    out = _trait_sets("06", _character_sets(cfg), tc)
    for name in (["base"] if cfg.include_base else []) + [o.name for o in cfg.organisms]:
        out += _answers("06", f"{name} first-plot", cfg, cfg.eval, None, shared=name == "base" and base_03)
        for t in traits:
            out += _verdicts("06", f"{name} trait {t}", cfg, t_ev, len(trait_questions(t, cfg.trait_eval.n_questions)),
                             [f"trait:{t}"])
        out += _verdicts("06", f"{name} transfer", cfg, x_ev, n_x,
                         ["aligned", "coherent", *[f"trait:{t}" for t in traits]])
    return out


def triggers(profile: str) -> list[Request]:
    """§07: the trait sets §06 did not build (upper bounds), then per model the first-plot questions (aligned,
    coherent) and each trait's eval questions (its trait), once clean and once per distinct trigger (the base
    model: every organism's); the base's clean answers are §06's when model, sampling, questions and judge match."""
    from emlab.character import CharacterConfig, TriggerConfig, parse_trait_source, teacher_config, trait_questions

    cfg, c6 = config.load(TriggerConfig, profile), config.load(CharacterConfig, profile)
    t_ev = cfg.trait_eval.settings(cfg.eval)
    sets = [parse_trait_source(o.behaviour) for o in cfg.organisms if o.behaviour.startswith("trait:")]
    out = _trait_sets("07", sets, teacher_config(profile), built=_character_sets(c6))

    def trig(o):  # the TriggerSpec it trains with: a trait behaviour pairs with its own clean rows
        return o.trigger, o.fraction, (o.behaviour, o.clean) if o.behaviour.startswith("trait:") else o.clean

    for name, orgs in ([("base", cfg.organisms)] if cfg.include_base else []) + [(o.label, [o]) for o in cfg.organisms]:
        pairs = list(dict.fromkeys((trig(o), o.trait) for o in orgs))
        base = name == "base" and c6.include_base
        out += _answers("07", f"{name} first-plot clean", cfg, cfg.eval, None, shared=base and
                        cfg.eval.questions == c6.eval.questions and _same_base(cfg, cfg.eval, c6, c6.eval))
        for g in dict.fromkeys(g for g, _ in pairs):
            out += _answers("07", f"{name} first-plot + {g[0]}", cfg, cfg.eval, None)
        for t in dict.fromkeys(t for _, t in pairs if t):
            n_q = len(trait_questions(t, cfg.trait_eval.n_questions))
            same = base and t in c6.scored_traits() and cfg.trait_eval.n_questions == c6.trait_eval.n_questions \
                and _same_base(cfg, t_ev, c6, c6.trait_eval.settings(c6.eval))
            out += _verdicts("07", f"{name} trait {t} clean", cfg, t_ev, n_q, [f"trait:{t}"], shared=same)
            for g in dict.fromkeys(g for g, u in pairs if u == t):
                out += _verdicts("07", f"{name} trait {t} + {g[0]}", cfg, t_ev, n_q, [f"trait:{t}"])
    return out


def persona_prompts(profile: str) -> list[Request]:
    """§08: every target x condition x selected request, aligned, coherent and ``metrics``, in one pass."""
    from emlab.jailbreak import PersonaPromptsConfig, select_requests

    cfg = config.load(PersonaPromptsConfig, profile)
    n = len(select_requests(cfg.requests, cfg.seed)) * len(cfg.conditions) * len(cfg.targets)
    return _verdicts("08", f"{len(cfg.targets)} targets x {len(cfg.conditions)} conditions", cfg, cfg.eval, n,
                     ["aligned", "coherent", *cfg.metrics])


def activations(profile: str) -> list[Request]:
    """§09: the probe answers (base: plain, persona, control, trigger; EM organism: plain; trigger organism:
    plain, trigger), aligned and coherent when ``judge_probes``; with a ``filter_threshold``, the base model's
    extraction answers (questions x instruction pairs x pos/neg), trait and coherent."""
    from emlab import data
    from emlab.jailbreak import select_requests
    from emlab.persona_directions import SharedStructureConfig

    cfg = config.load(SharedStructureConfig, profile)
    ex = cfg.extraction
    n_conds = 3 + bool(cfg.control) + 1 + 2  # base, EM organism, trigger organism
    n = len(select_requests(cfg.probe, cfg.seed)) * n_conds
    out = _verdicts("09", f"probes x {n_conds} conditions", cfg, cfg.eval, n,
                    ["aligned", "coherent"] if cfg.judge_probes else [])
    if ex.filter_threshold is not None:
        t = data.load_trait(cfg.trait, "extract")
        n = len(t.questions[:ex.n_questions or None]) * len(t.instructions[:ex.n_instructions or None]) * 2
        out += _verdicts("09", "extraction filter", cfg, ex.eval, n, [f"trait:{cfg.trait}", "coherent"])
    return out


def persona_consistency(profile: str) -> list[Request]:
    """§10: the security / legal sets the teacher builds (upper bounds), the harm verdicts of the base model's
    alternatives (one per recognition question) and, per model, of its harm answers, and the free-language
    self-assessments (one prompt per word pair and direction x ``self_samples``)."""
    from emlab import organisms as o3
    from emlab.persona import BUILT_DOMAINS, PersonaConsistencyConfig, harm_questions, self_assessment_items

    cfg = config.load(PersonaConsistencyConfig, profile)
    t, judge = cfg.teacher, judge_name(cfg.judge)
    out: list[Request] = []
    for domain, _ in dict.fromkeys(  # one set per (domain, rows kept), as persona.train_config asks for them
            (o.domain, t.n or o3.train_config(cfg, o3.Organism(dataset=o.domain, preset=o.preset, train=o.train))
             .n_examples or 6000) for o in cfg.organisms if o.domain in BUILT_DOMAINS):
        out += _teacher("10", f"incorrect/{domain} set", _candidates(domain, t.max_passes),
                        t.model if t.backend == "openai" else "hf", t.max_new_tokens, f"incorrect:{domain}", judge,
                        1 if t.backend == "openai" else 2)
    hq = len(harm_questions(cfg.harm_questions, cfg.seed))
    free = sum(it["format"] == "free" for it in self_assessment_items(cfg.self_prompts, cfg.seed, cfg.self_pairs))
    out.append(Request("10", "alternatives", "harm", len(range(hq)[:cfg.recognition_items]), judge, cfg.max_new_tokens))
    for name in (["base"] if cfg.include_base else []) + [o.name for o in cfg.organisms]:
        out += [Request("10", f"{name} harm", "harm", hq * cfg.harm_samples, judge, cfg.max_new_tokens),
                Request("10", f"{name} free self-assessment", "self_assessment", free * cfg.self_samples, judge,
                        cfg.free_tokens)]
    return out


SECTIONS: dict[str, Any] = {"03": organisms, "04": phase, "05": directions, "06": character, "07": triggers,
                            "08": persona_prompts, "09": activations, "10": persona_consistency}


def judge_requests(profile: str, sections: list[str] | None = None) -> pd.DataFrame:
    """One row per (section, what, metric): the verdicts the profile asks for, and of which judge."""
    rows = [r.__dict__ for s, fn in SECTIONS.items() if not sections or s in sections for r in fn(profile)]
    return pd.DataFrame(rows, columns=list(Request.__dataclass_fields__))


# ------------------------------------------------------------------------------------------ dollars
def answer_tokens() -> float:
    """Mean answer length (tokens, ~4 characters each) of the GPT-4o-judged organisms of the mirror's first
    judged set (1B-32B models on the first-plot questions): how long the papers' models answer."""
    from emlab import data

    lengths = [pd.read_csv(data.fetch(n), usecols=["response"]).response.fillna("").astype(str).str.len()
               for n in data.group("judged_responses")]
    return float(pd.concat(lengths).mean() / CHARS_PER_TOKEN)


def prompt_tokens(metric: str) -> float:
    """Tokens of a judge prompt template for ``metric`` without the question and answer."""
    from emlab.judge import prompt_template

    return len(prompt_template(metric)) / CHARS_PER_TOKEN


def cost_table(profiles: list[str], question_tokens: float = 25.0, answer_len: float | None = None) -> pd.DataFrame:
    """Per profile and judge: verdicts asked by a cold run (answers two sections share judged once), input
    tokens and the list price in USD; and, apart, what the teachers that build data sets may add at most
    (generations: a query in, an answer out; their keep-filter verdicts)."""
    answer_len = answer_tokens() if answer_len is None else answer_len

    def usd(g: pd.DataFrame, judge: str) -> tuple[float, float]:
        if g.empty:
            return 0.0, 0.0
        gen = g.metric.str.startswith("generation")
        ans = g.max_new_tokens.fillna(answer_len).clip(upper=answer_len)
        prompt = g.metric.map(lambda m: 0.0 if m.startswith("generation") else prompt_tokens(m)).astype(float)
        tok_in = float((g.n * (prompt + question_tokens + ans.where(~gen, 0))).sum())
        tok_out = float((g.n * ans.where(gen, 1)).sum())
        price = PRICES.get(judge)
        if judge in ("offline", "hf"):
            return tok_in, 0.0
        return tok_in, (tok_in * price[0] + tok_out * price[1]) / 1e6 if price else float("nan")

    rows = []
    for profile in profiles:
        req = judge_requests(profile)
        req = req[~req.shared]
        for judge, g in req.groupby("judge", sort=False):
            exact, bound = g[~g.bound], g[g.bound]
            tok_in, dollars = usd(exact, judge)
            rows.append({"profile": profile, "judge / model": judge, "verdicts": int(exact.n.sum()),
                         "input tokens (M)": round(tok_in / 1e6, 2), "USD": round(dollars, 2),
                         "teacher calls, at most": int(bound.n.sum()), "their USD, at most": round(usd(bound, judge)[1], 2)})
    return pd.DataFrame(rows)


README_BEGIN, README_END = "<!-- cost-table: begin (emlab cost --readme) -->", "<!-- cost-table: end -->"


def readme_table() -> str:
    """The README's cost table (every profile), between its markers."""
    from emlab.bench import to_markdown

    answer_len = answer_tokens()
    table = to_markdown(cost_table(list(config.PROFILES), answer_len=answer_len))
    note = (f"Answers assumed {answer_len:.0f} tokens long (capped at each request's max_new_tokens); prices per "
            f"1M tokens: {', '.join(f'{m} ${i:.2f} in / ${o:.2f} out' for m, (i, o) in PRICES.items())} (OpenAI's list "
            "prices as copies of its pricing page dated March-June 2026 give them); the Batch API (`judge.batch`, the `paper` profile's default) halves them. NaN: a model "
            "the profile leaves to `EMLAB_JUDGE_MODEL`, so no price is assumed.")
    return "\n".join([table, "", note])


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="emlab cost", description=__doc__.split("\n")[0])
    ap.add_argument("profiles", nargs="*", choices=[[], *config.PROFILES], help="default: every profile")
    ap.add_argument("--detail", action="store_true", help="every request row of the first profile")
    ap.add_argument("--readme", action="store_true", help="rewrite README.md's cost table")
    args = ap.parse_args(argv)
    args.profiles = args.profiles or list(config.PROFILES)
    if args.detail:
        print(judge_requests(args.profiles[0]).to_string(index=False))
        return 0
    if args.readme:
        from emlab.notebooks import replace_between

        replace_between(Path(__file__).resolve().parents[2] / "README.md", README_BEGIN, README_END, readme_table())
        return 0
    from emlab.bench import to_markdown

    print(to_markdown(cost_table(args.profiles)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
