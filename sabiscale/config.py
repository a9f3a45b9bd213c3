"""The one typed run config: a YAML recipe plus `key=value` overrides.

Every setting has one owner here and travels down as a field of `RunConfig`; nothing below reads
the environment. Unknown keys and impossible values are collected and reported all at once.

    cfg = load_config("launch/recipes/demo.yaml", ["train.max_steps=50", "model.num_layers=2"])
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from sabiscale.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sabiscale.tasks import BUILTIN_TASKS, TaskDef, task_registry


class ConfigError(UserError):
    """A recipe or override the user must fix; the message lists every problem found."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FileSource(_Section):
    """One input of data.source=files: a file (or a glob of files) of one task. The corpus reader
    expands a glob into one FileSource per file."""

    task: str
    path: str                   # a file or a glob (sorted); relative to the working directory
    # parquet: a Parquet file, one record per row; hf: a Hugging Face `datasets` directory written
    # by save_to_disk, or (online) a dataset name given to datasets.load_dataset with `hf_args`
    format: Literal["jsonl", "tsv", "conll", "text", "parquet", "hf"] = "jsonl"
    lang: str | None = None     # the language of records that do not name one in their lang_field
    fields: dict[str, str] = {}  # jsonl, parquet, hf: task field -> key in the record, e.g. {text: body}
    columns: list[str] = []     # tsv: the column names in order, e.g. [src, tgt]
    header: bool = False        # tsv: the first line is a header (it names the columns if columns is empty)
    documents: Literal["line", "paragraph"] = "line"  # text: one document per line, or per blank-line paragraph
    hf_args: dict[str, Any] = {}  # hf: datasets.load_dataset / the split of a saved DatasetDict, e.g. {split: train}

    @model_validator(mode="after")
    def _format_options(self) -> "FileSource":
        if self.format == "tsv" and not self.columns and not self.header:
            raise ValueError("a tsv source needs columns (e.g. [src, tgt]) or header: true")
        return self


class MixWeights(_Section):
    """Language shares follow temperature sampling, q_l proportional to (n_l / N)^(1/temperature)
    times language_weights[l] (XLM-R and mT5 style: temperature > 1 lifts small languages; 1 keeps
    the natural shares). Inside a language, tasks keep their natural shares times task_weights[t]."""

    temperature: float = Field(1.0, gt=0)
    task_weights: dict[str, float] = {}
    language_weights: dict[str, float] = {}

    @model_validator(mode="after")
    def _non_negative(self) -> "MixWeights":
        bad = {k: v for k, v in {**self.task_weights, **self.language_weights}.items() if v < 0}
        if bad:
            raise ValueError(f"mixing weights must be >= 0, got {bad}")
        return self

    def is_natural(self) -> bool:
        return self.temperature == 1.0 and all(w == 1.0 for w in (*self.task_weights.values(),
                                                                   *self.language_weights.values()))


class MixPhase(MixWeights):
    """One phase of data.mix.schedule: from optimizer step `start_step` on, the loader draws each
    (task, language) source by these weights (data/schedule.py)."""

    start_step: int = Field(ge=0)


class MixConfig(MixWeights):
    """How much of each language and task training sees (the weights: MixWeights).

    Without a schedule the mix is fixed when `prepare` writes the shards: groups are up-sampled by
    repeating documents and down-sampled by a seeded choice of whole documents, the total staying
    the corpus's size, and the manifest reports natural, target and realized amounts per
    task/language. With `schedule`, `prepare` writes the shards per source (task x language) at
    their natural sizes and the loader draws the mix at train time, phase by phase; changing the
    schedule needs no new `prepare`. The validation split is never resampled.
    """

    # What the shares are counted in. tokens: what the model sees, but a language the tokenizer
    # splits badly looks bigger than it is and is sampled down; bytes (UTF-8) or words of the raw
    # text: the same text weighs the same whatever the tokenizer does with it.
    unit: Literal["tokens", "bytes", "words"] = "tokens"
    # Phases by optimizer step, e.g. more plain text first and more tasks later; the first starts at 0.
    schedule: list[MixPhase] = []

    @model_validator(mode="after")
    def _schedule_in_order(self) -> "MixConfig":
        if not self.schedule:
            return self
        starts = [phase.start_step for phase in self.schedule]
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"data.mix.schedule: phases must start at step 0 and then at increasing steps, got "
                             f"start_step {starts}")
        if not self.is_natural():
            raise ValueError("data.mix.schedule is set, and so are data.mix.temperature/task_weights/language_weights: "
                             "with a schedule the weights belong to its phases; move them into the first phase")
        return self

    def weights_named(self) -> list[MixWeights]:
        """Every set of weights the recipe gives (the top level and each phase)."""
        return [self, *self.schedule]


def check_language_weights(weights: dict[str, float], languages: set[str], known_from: str) -> None:
    """Language weights that name a language not in `languages` would be ignored, and weights
    that are all 0 leave nothing to sample: both refused, with the closest known name (a UserError
    is a ValueError: the config's validators raise it too)."""
    import difflib

    unknown = sorted(set(weights) - languages)
    if unknown:
        hints = [f"{lang!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(lang, sorted(languages), 1))
                 else repr(lang) for lang in unknown]
        raise UserError(f"data.mix.language_weights names language(s) not in {known_from}: {', '.join(hints)}; "
                         f"the languages are {sorted(languages)}. Fix the name or remove the weight")
    if languages and all(weights.get(lang, 1.0) == 0 for lang in languages):
        raise UserError(f"data.mix.language_weights gives every language ({sorted(languages)}) weight 0: nothing "
                         "would be sampled; give at least one a weight above 0")


LAYOUT_TASKS = ["translation", "ner", "sentiment", "descramble", "text"]


class HoldBack(_Section):
    """A stable hash share of some tasks' training records, kept out of one prepared data set and
    given to another: Rho-1's reference learns from target records its base never saw (the base
    prepares with keep=rest, the reference with keep=share and the same tasks, share and files).
    Held-back records are not held out for evaluation: the evaluation records stay the same."""

    tasks: list[str]
    share: float = Field(0.5, gt=0.0, lt=1.0)
    keep: Literal["rest", "share"]  # rest: train on all but the share; share: on the share only


class DataConfig(_Section):
    # "demo": the embedded generator; "jsonl": a directory in the task layout
    # (<task>/<lang>.jsonl, translation/eng-<lang>.jsonl; descramble, langid and diacritize read
    # text/); "files": the inputs listed under `files`, in any supported format.
    source: Literal["demo", "jsonl", "files"] = "demo"
    jsonl_root: Path | None = None
    files: list[FileSource] = []
    # Tasks declared in the recipe (or built-ins redefined): see sabiscale/tasks.py.
    task_defs: dict[str, TaskDef] = {}
    demo_examples_per_task: int = Field(600, gt=0)
    # Cap on records read from each input file (None = all); keeps tests and smoke runs small.
    max_records_per_file: int | None = Field(None, gt=0)
    # Tasks to use; None = translation, ner, sentiment, descramble, text for demo/jsonl, and every
    # task named in `files` for files.
    tasks: list[str] | None = None
    languages: list[str] | None = None  # None = every language found
    mix: MixConfig = MixConfig()
    # A bad record (malformed line, missing or empty field, wrong type) stops
    # `prepare` with its location; with skip_bad it is skipped, and every skipped record is listed
    # by location and reason in <shards>/skipped.jsonl and counted in the manifest.
    skip_bad: bool = False
    # `prepare` processes for reading and shard writing (tokenizing already runs on every core);
    # the shards are byte-identical for any number.
    prepare_workers: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=16)
    sequences_per_shard: int = Field(256, gt=0)
    # Share of documents held out for the validation shards (the loss curve during training).
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    # Records whose `orig_split` is one of these never reach the train or validation shards: they
    # are what `sabiscale eval --split dev` scores.
    heldout_splits: list[str] = ["dev", "test"]
    # Records without an `orig_split` (plain text, the demo corpus) are held out for eval by a
    # stable hash of their location: this share of them.
    heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    # None: every training record of every task is used (see HoldBack)
    hold_back: HoldBack | None = None
    # "exact": drop training documents that repeat an earlier one (low-resource web text repeats a
    # lot); "near": also those whose estimated word-3-gram Jaccard similarity to an earlier one of
    # the same task and language reaches near_dup_threshold (MinHash-LSH, prep/near_dup.py; the
    # pairs are listed in shards/near_duplicates.jsonl); "none": keep every copy.
    dedup: Literal["exact", "near", "none"] = "exact"
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    # JSONL files of evaluation records: training documents sharing a text or a 13-gram with any
    # of their string fields are dropped at prepare (counted in the manifest).
    decontaminate_against: list[Path] = []
    # Training-time DataLoader processes per rank that read and decode shards (0 = in the training
    # process). auto: 2 on a GPU whose rank has cores to spare for them (the batches then come pinned and
    # prefetched, copied to the GPU asynchronously), 0 on the CPU, where workers would take the
    # cores the training itself computes on (train/device.py::choose_loader_workers).
    loader_workers: int | Literal["auto"] = "auto"

    @field_validator("loader_workers")
    @classmethod
    def _workers_not_negative(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("data.loader_workers is a number of processes (0 or more) or auto")
        return value
    # Where `prepare` writes the prepared data (raw demo corpus, tokenizer, shards + manifest), once,
    # for every run of recipes that name it; each run keeps its own output_dir (checkpoints,
    # MLflow, plots). None: inside the run's output_dir.
    dir: Path | None = None
    # Train from these shards instead of <data dir>/shards, e.g. shards carrying reference losses
    # written by `sabiscale score` (then also set tokenizer.path to their tokenizer).
    shards_dir: Path | None = None

    @model_validator(mode="after")
    def _sources_and_tasks(self) -> "DataConfig":
        if self.source == "files" and not self.files:
            raise ValueError("data.source is 'files' but data.files lists no inputs")
        if self.files and self.source != "files":
            raise ValueError(f"data.files is set but data.source is {self.source!r}; set data.source=files to read them")
        if self.tasks is None:
            self.tasks = (list(dict.fromkeys(f.task for f in self.files)) if self.source == "files"
                          else list(LAYOUT_TASKS))
        known = task_registry(self.task_defs)
        unknown = sorted({*self.tasks, *(f.task for f in self.files)} - set(known))
        if unknown:
            raise ValueError(f"task(s) {unknown} are neither built in ({sorted(BUILTIN_TASKS)}) nor declared in "
                             "data.task_defs")
        if self.source == "files" and not {f.task for f in self.files} & set(self.tasks):
            raise ValueError(f"data.tasks {self.tasks} selects none of the tasks in data.files")
        if self.val_fraction + self.heldout_fraction >= 1:
            raise ValueError(f"data.val_fraction ({self.val_fraction}) + data.heldout_fraction "
                             f"({self.heldout_fraction}) must leave records to train on (sum < 1)")
        if self.hold_back is not None and not set(self.hold_back.tasks) <= set(self.tasks):
            raise ValueError(f"data.hold_back.tasks {self.hold_back.tasks} names tasks not in data.tasks "
                             f"{self.tasks}: hold back a share of tasks the data has")
        unused = {t for weights in self.mix.weights_named() for t in weights.task_weights} - set(self.tasks)
        if unused:
            raise ValueError(f"data.mix task_weights name tasks not in data.tasks: {sorted(unused)}")
        if self.val_fraction == 0:
            raise ValueError("data.val_fraction is 0, but training evaluates on the validation split (its loss "
                             "curve, the probe tokens): give a share above 0, e.g. 0.02")
        if self.languages is not None:  # the data's own languages are checked at prepare, before anything is written
            for weights in self.mix.weights_named():
                check_language_weights(weights.language_weights, set(self.languages), "data.languages")
        return self


class TokenizerConfig(_Section):
    vocab_size: int = Field(4096, ge=300)
    min_frequency: int = Field(2, ge=1)
    # An existing tokenizer.json to reuse instead of training one.
    path: Path | None = None


class ModelConfig(_Section):
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int = Field(344, gt=0)
    tie_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        return self


class LossConfig(_Section):
    # masked: only answer tokens count (SabiYarn); clm: every real token counts;
    # selective: Rho-1 - of the answer tokens of each micro-batch, only the `ratio` share with the
    # highest excess loss (current minus reference loss) counts. Any kind registered in
    # sabiscale/loss/kinds.py is accepted.
    kind: str = "masked"
    ratio: float = Field(0.6, gt=0, le=1)
    # Where selective training gets reference losses: "shards" (written once by `sabiscale score`)
    # or "online" (a frozen reference model on the same device scores every micro-batch).
    reference: Literal["shards", "online"] = "shards"
    reference_checkpoint: Path | None = None  # for reference=online: a sabiscale checkpoint
    # selective kind: which `ratio` share of the answer tokens trains. top: those with the highest
    # excess loss (Rho-1). sample: drawn without replacement with probability proportional to
    # exp(excess / temperature) (Gumbel top-k), so tokens just below the cut still train now and
    # then; the draw is seeded by the run's seed and the micro-batch's place in the data stream,
    # so any number of ranks, and a resume, draw the same tokens.
    selection: Literal["top", "sample"] = "top"
    temperature: float = Field(1.0, gt=0)  # nats of excess loss per e-fold of the odds (sample only)
    # Per-task multipliers of each token's loss (default 1). A weight of 0 drops the task's tokens
    # from the loss and from the head's compute; the loss is divided by the count of weighted tokens.
    task_weights: dict[str, float] = {}
    # masked kind only: the weight of prompt tokens' losses (0: SabiYarn's masked loss, the head
    # runs on answer tokens only; 1: every token counts, as kind clm; in between, prompt tokens
    # count with this weight). Like task weights, it scales losses; the loss is divided by the
    # number of counted tokens.
    prompt_weight: float = Field(0.0, ge=0, le=1)
    # Supervised positions per chunk of the output head; bounds the logits held at once.
    chunk_size: int = Field(2048, gt=0)

    @model_validator(mode="after")
    def _known_kind(self) -> "LossConfig":
        from sabiscale.loss.kinds import LOSS_KINDS  # the registry imports torch: only when a config is checked

        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind {self.kind!r} is not one of {sorted(LOSS_KINDS)}")
        problems = LOSS_KINDS[self.kind].problems(self)
        if self.selection != "top" and not LOSS_KINDS[self.kind].selects:
            problems.append(f"loss.selection={self.selection} applies to a kind that selects (selective), "
                            f"not loss.kind={self.kind}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OptimConfig(_Section):
    # adamw: DeepSpeed's (fused on GPUs, DeepSpeedCPUAdam under optimizer offload), from the JSON.
    # adamw8bit / paged_adamw8bit: bitsandbytes' 8-bit AdamW as a client optimizer: moments in
    # 1 byte each instead of 4, also on the host under optimizer offload; the paged variant lets
    # CUDA page its states to host memory under pressure (not with offload, where they live there).
    kind: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(20, ge=1)
    grad_clip: float = Field(1.0, ge=0)


class TrainConfig(_Section):
    micro_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    # Sequences per optimizer step over all ranks. When set, grad_accum_steps follows from it and
    # the world size at launch (global = micro x accumulation x ranks), so one recipe keeps its
    # batch on 1 GPU or 64; a global batch the world cannot split evenly is an error.
    global_batch_size: int | None = Field(None, gt=0)
    max_steps: int = Field(200, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)  # 0 = only at the end
    # validation micro-batches per evaluation, in all: the same set on any number of ranks, split over them
    eval_batches: int = Field(4, gt=0)
    checkpoint_every: int = Field(0, ge=0)  # 0 = only at the end
    keep_last: int = Field(2, ge=0)         # newest checkpoints kept (0 = all) ...
    keep_every: int = Field(0, ge=0)        # ... plus every N-th step (0 = none)
    # Every N steps (and at the end) a Hugging Face directory <checkpoint>/hf beside a checkpoint
    # of that step (saved then if checkpoint_every does not fall there), written by a child
    # process while training goes on; `sabiscale eval` and `eval --harness` take it. 0 = off.
    export_every: int = Field(0, ge=0)
    # auto: continue from the newest complete checkpoint in output_dir if there is one;
    # must: the same, but it is an error if there is none; never: refuse to run over checkpoints.
    resume: Literal["auto", "must", "never"] = "auto"
    # Continual pre-training: a new run starts from the weights of this checkpoint (a step
    # directory, or checkpoints/ for `latest`) with a fresh step count, optimizer and LR schedule.
    # Its tokenizer must be the shards' and its model the recipe's. Ignored once the run has its
    # own checkpoints (it then resumes from them).
    init_from: Path | None = None
    # Recompute each layer's activations in backward instead of keeping them: less memory for
    # ~1/3 more compute (transformers' non-reentrant gradient checkpointing).
    activation_checkpointing: bool = False
    # A view inside the step (train/diagnostics.py). profile_steps "a:b": a torch profiler trace of
    # steps a..b per rank in <output_dir>/profile/ (Perfetto, chrome://tracing) and in MLflow.
    profile_steps: str | None = Field(None, pattern=r"^[1-9][0-9]*:[1-9][0-9]*$")
    # A training step slower than watchdog_factor x the median step so far, and than
    # watchdog_min_seconds, writes every thread's Python stack of the rank to <output_dir>/watchdog/
    # and tags the run watchdog/slow_step: a hang is seen in seconds, not at the process-group
    # timeout. 0 = off.
    watchdog_factor: float = Field(20.0, ge=0)
    watchdog_min_seconds: float = Field(60.0, gt=0)
    # On CUDA, keep the allocator's recent history so an out-of-memory error leaves a snapshot in
    # <output_dir>/oom/ (pytorch.org/memory_viz); costs a Python stack capture per allocation.
    # Every device writes oom/rank<N>.json (peak memory, the step, the planner's estimate).
    oom_snapshot: bool = True
    # Per-token losses of a fixed probe set (the first probe_batches validation micro-batches)
    # every N steps, for `sabiscale analyze` (0 = off).
    probe_every: int = Field(0, ge=0)
    probe_batches: int = Field(4, gt=0)
    # Write the sample keys of every step to <output_dir>/trace/rank<N>.jsonl (audits, tests).
    trace_samples: bool = False
    # Optimizer steps in a row with a non-finite loss or gradient (each skipped by DeepSpeed,
    # parameters untouched) before training stops with the step and batches named.
    max_nonfinite_steps: int = Field(5, ge=1)
    # torch.compile of each decoder layer's elementwise work and projections (model/layer.py).
    # auto: on for CUDA GPUs (Triton, compute capability 7.0 on); off on the CPU, where it
    # measured 1.05x the step rate for ~30 s of compilation on a cold cache, paying back after
    # ~340 steps (benchmarks/results/step_throughput_zero2_offload.md): turn it on for long runs.
    compile: Literal["auto", "on", "off"] = "auto"
    # q/k/v and gate/up each in one matmul (model/layer.py); false runs transformers' modules as
    # they are. ZeRO-3 always runs the modules (its parameters are whole only inside their own call).
    fused_projections: bool = True
    # Peak FLOP/s of one device, for train/mfu; None = measured at start with a matmul
    # (a small CPU server in fp32 measures about 1e11-2e11).
    peak_flops_per_s: float | None = Field(None, gt=0)

    @field_validator("profile_steps")
    @classmethod
    def _window_in_order(cls, value):
        if value is not None:
            first, last = (int(part) for part in value.split(":"))
            if first > last:
                raise ValueError(f"profile_steps {value!r}: the first step is after the last; write first:last, e.g. 10:12")
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML reads a bare on/off (recipe or CLI override) as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class EngineConfig(_Section):
    # A DeepSpeed JSON; keys sabiscale owns are "auto" there and filled from this config. auto:
    # on a GPU the cheapest profile `sabiscale plan` finds to fit its memory for this model,
    # optimizer and activation checkpointing (zero1 for the recipes' models on one 24 GB GPU);
    # on the CPU zero2_offload, which these CPUs were measured with; a resumed run keeps its own.
    ds_config: Literal["auto"] | Path = "auto"
    # auto: bf16 on GPUs with native bf16 (compute capability 8.0 on), fp16 with loss scaling on
    # older GPUs; on the CPU bf16 where it has native bf16 and the model is wide enough for bf16 to
    # be measured faster there (128 with AVX512-BF16, 256 with AMX), fp32 otherwise.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: the GPUs where torch can use them; where nvidia-smi sees GPUs that this torch cannot
    # use, training refuses to fall back to the CPU and says what to install. cpu: train on the
    # CPU on purpose, also where GPUs are present.
    device: Literal["auto", "cpu"] = "auto"
    # How long a collective waits for the slowest rank before the run fails. Rank-0 work between
    # two collectives (converting a checkpoint to the universal format, hashing a large
    # checkpoint) must fit in it; torch's default is 10 minutes.
    collective_timeout_minutes: float = Field(60.0, gt=0)


class TrackingConfig(_Section):
    # None: MLFLOW_TRACKING_URI if set (resolved at the CLI edge), else sqlite in the run directory.
    uri: str | None = None
    experiment: str | None = None  # None = the recipe name
    run_name: str | None = None    # None = "<recipe name>-<UTC timestamp>"
    run_id: str | None = None      # continue this MLflow run instead of starting a new one
    enabled: bool = True
    # MLflow's own CPU/memory/disk/GPU sampling next to the training metrics.
    system_metrics: bool = True
    # "path": record where the checkpoint is; "artifact": also upload it to the run's artifact store.
    checkpoints: Literal["path", "artifact"] = "path"
    # while the store is unreachable, how often to try again (records wait in the run's journal)
    retry_seconds: float = Field(30.0, ge=0)
    # A resume whose store (uri) is not the one its MLflow run lives in: "continue" logs on to the
    # run in its own store (said in the log); "new_run" starts a new MLflow run in the given store.
    on_store_change: Literal["continue", "new_run"] = "continue"


class RunConfig(_Section):
    name: str = "run"
    recipe: Path | None = None  # the YAML this config came from (set by load_config)
    output_dir: Path = Path("runs/run")
    seed: int = 1234
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    engine: EngineConfig = EngineConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.data.source == "jsonl" and self.data.jsonl_root is None:
            raise ValueError("data.source is 'jsonl' but data.jsonl_root is not set")
        bad_weights = {k: v for k, v in self.loss.task_weights.items() if v < 0}
        if bad_weights:
            raise ValueError(f"loss.task_weights must be >= 0, got {bad_weights}")
        unknown = set(self.loss.task_weights) - set(self.data.tasks)
        if unknown:
            raise ValueError(f"loss.task_weights names tasks not in data.tasks: {sorted(unknown)}")
        t = self.train
        if t.global_batch_size is not None and t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({t.micro_batch_size})")
        return self

    # Paths every stage agrees on, derived from data.dir and output_dir so they cannot drift apart.
    @property
    def prepared_dir(self) -> Path:
        """Where the prepared data live: data.dir, shared by runs, or the run's own output_dir."""
        return self.data.dir or self.output_dir

    @property
    def tokenizer_path(self) -> Path:
        return self.prepared_dir / "tokenizer" / "tokenizer.json"

    @property
    def shards_dir(self) -> Path:
        return self.data.shards_dir or self.prepared_dir / "shards"

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"


def resolve_warmup(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """The config with a warm-up that fits the run, and the note to print when it was shortened:
    a recipe's warm-up (say 100 steps) stays usable for a 30-step try-out (then a tenth of it)."""
    if cfg.optim.warmup_steps < cfg.train.max_steps:
        return cfg, None
    resolved = cfg.model_copy(deep=True)
    resolved.optim.warmup_steps = max(1, cfg.train.max_steps // 10)
    return resolved, (f"optim.warmup_steps {cfg.optim.warmup_steps} is not below train.max_steps "
                      f"{cfg.train.max_steps}: warming up for {resolved.optim.warmup_steps} steps instead")


def resolve_batch(cfg: RunConfig, world_size: int) -> RunConfig:
    """The config with grad_accum_steps derived from train.global_batch_size for this world size."""
    t = cfg.train
    if t.global_batch_size is None:
        return cfg
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        fits = [n for n in range(1, t.global_batch_size // t.micro_batch_size + 1)
                if t.global_batch_size % (t.micro_batch_size * n) == 0]
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x {world_size} ranks = {per_step}; with this micro-batch it splits over "
            f"{fits} ranks; change global_batch_size, micro_batch_size or the number of ranks")
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps not in (1, accum):
        raise ConfigError(f"train.grad_accum_steps ({t.grad_accum_steps}) contradicts train.global_batch_size "
                          f"({t.global_batch_size} = {t.micro_batch_size} x {accum} x {world_size} ranks); set only one")
    resolved = cfg.model_copy(deep=True)
    resolved.train.grad_accum_steps = accum
    return resolved


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is parsed as YAML so 3, 1e-3, true, [a,b] work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.max_steps=50)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


# Keys an earlier sabiscale accepted -> their name now.
RENAMED = {"data.workers": "data.prepare_workers", "data.num_workers": "data.loader_workers"}
# Keys an earlier sabiscale accepted that are gone -> why.
REMOVED = {"data.shuffle_buffer": "removed: the sample order is a seeded shuffle of shards and of the samples in each "
                                  "(sabiscale/data/order.py), read by index; delete the key"}


def _unknown_key(where: str) -> str:
    if where in RENAMED:
        return f"renamed: use {RENAMED[where]}"
    if where in REMOVED:
        return REMOVED[where]
    *parents, key = where.split(".")
    section: type[BaseModel] = RunConfig
    for part in parents:
        field = section.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return "unknown key (see sabiscale/config.py for the fields)"
        section = field.annotation
    close = difflib.get_close_matches(key, list(section.model_fields), n=1)
    hint = f"did you mean {'.'.join([*parents, close[0]])}?" if close else "see sabiscale/config.py for the fields"
    return f"unknown key ({hint})"


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} problem(s) in the run config:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = _unknown_key(where) if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def build_config(tree: dict, origin: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error naming both
    lines: plain YAML keeps the last silently (a second `data:` replaces the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start from defaults), apply overrides, validate everything at once."""
    tree: dict = {}
    origin = "overrides"
    if recipe is not None:
        recipe = Path(recipe)
        origin = str(recipe)
        if not recipe.is_file():
            raise ConfigError(f"recipe {recipe} does not exist (recipes live in launch/recipes/)")
        try:
            loaded = yaml.load(recipe.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{recipe}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{recipe}: the top level must be a mapping of sections")
        tree = loaded or {}
        tree.setdefault("name", recipe.stem)
        tree["recipe"] = str(recipe)
    tree = apply_overrides(tree, overrides or [])
    return build_config(tree, origin)


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_paths(cfg: RunConfig, environ: dict) -> RunConfig:
    """What the edge (the CLI, a benchmark, a notebook) fills in before a config travels down:
    shipped resources (ds_configs/...) found from the project root when not under the working
    directory, and the tracking store from MLFLOW_TRACKING_URI when the recipe names none."""
    if cfg.engine.ds_config != "auto" and not cfg.engine.ds_config.is_absolute() and not cfg.engine.ds_config.exists():
        candidate = PROJECT_ROOT / cfg.engine.ds_config
        if candidate.exists():
            cfg.engine.ds_config = candidate
    if cfg.tracking.uri is None and environ.get("MLFLOW_TRACKING_URI"):
        cfg.tracking.uri = environ["MLFLOW_TRACKING_URI"]
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    """JSON-safe dict of the resolved config (paths as strings), for checkpoints and tracking."""
    return cfg.model_dump(mode="json")
