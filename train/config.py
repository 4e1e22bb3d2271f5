"""The training configuration: nested typed dataclasses, filled from a YAML recipe in configs/
and ``--set a.b=c`` overrides, coerced and validated by pydantic (data.typed) and the sections'
``__post_init__`` checks. DeepSpeed's JSON is generated from it (``deepspeed_config``), never kept
by hand."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data.typed import TypedConfigError, parse
from metrics import DEFAULT_KS
from model.config import RETIRED_FIELDS, ModelConfig

SHARDING_TYPES = ("row_wise", "table_wise", "column_wise")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adam", "sgd")
PRECISIONS = ("fp32", "bf16")
TABLE_DTYPES = ("fp32", "fp16")


class ConfigError(ValueError):
    pass


_STRICT_FIELDS = {"extra": "forbid"}  # pydantic: unknown keys are errors


@dataclass
class DataConfig:
    __pydantic_config__ = _STRICT_FIELDS

    shards: str = ""
    batch_size: int = 64  # per rank
    eval_batch_size: int = 256
    num_workers: int = 2
    shuffle: bool = True
    shuffle_buffer: int = 2048
    length_buckets: bool = True  # batch histories of similar length together (less padding; data.loader)

    def __post_init__(self):
        if not self.shards:
            raise ConfigError("data.shards: the prepared shard directory is required")
        if min(self.batch_size, self.eval_batch_size) < 1 or self.num_workers < 0:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1, data.num_workers >= 0")


@dataclass
class OptimConfig:
    __pydantic_config__ = _STRICT_FIELDS

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    grad_accumulation: int = 1

    def __post_init__(self):
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ConfigError(
                f"optim.sparse_optimizer must be one of {SPARSE_OPTIMIZERS}, got {self.sparse_optimizer!r}"
            )
        if self.grad_accumulation != 1:
            # TorchRec's fused optimizer updates the item tables inside every backward; accumulating
            # only the dense gradients would train the two parts on different effective batches.
            raise ConfigError(
                "optim.grad_accumulation must be 1: the fused sparse optimizer updates item embeddings in every "
                "backward, so accumulation would treat embeddings and dense weights differently; raise data.batch_size instead"
            )
        if self.lr <= 0 or self.sparse_lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.lr and optim.sparse_lr must be > 0, optim.min_lr_ratio in [0, 1]")


@dataclass
class ParallelConfig:
    __pydantic_config__ = _STRICT_FIELDS

    zero_stage: int = 2
    precision: str = "fp32"
    sharding: str = "row_wise"  # how TorchRec shards the item table
    # The item tables' weights. fp16 halves them (a 10^8 x 64 table: 12.8 GB instead of 25.6);
    # the fused optimizer updates them in place and keeps its row-wise Adagrad state in fp32, and
    # checkpoints and consolidated models store them as they are.
    table_dtype: str = "fp32"
    compile: bool = False  # torch.compile the dense model's decoder blocks (train.compile)
    # DeepSpeed's gradient-reduce and all-gather buckets, and ZeRO-3's prefetch and live-parameter
    # limits, in elements. DeepSpeed's defaults (5e8 / 1e9) hold several GB of fp32 buffers per rank:
    # with them a 3.5e8-parameter model used more memory under ZeRO-2 than under ZeRO-0 and was
    # killed under ZeRO-3 on this 24 GiB machine (benchmarks/zero_memory.py).
    bucket_elements: int = 50_000_000

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"parallel.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.sharding not in SHARDING_TYPES:
            raise ConfigError(f"parallel.sharding must be one of {SHARDING_TYPES}, got {self.sharding!r}")
        if self.table_dtype not in TABLE_DTYPES:
            raise ConfigError(f"parallel.table_dtype must be one of {TABLE_DTYPES}, got {self.table_dtype!r}")
        if self.bucket_elements < 1:
            raise ConfigError("parallel.bucket_elements must be >= 1")
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ConfigError("parallel.precision bf16 needs zero_stage >= 1 (stage 0 keeps no fp32 master weights)")


@dataclass
class ScheduleConfig:
    __pydantic_config__ = _STRICT_FIELDS

    epochs: int = 10
    max_steps: int = 0  # 0: no limit
    eval_every: int = 1  # epochs
    patience: int = 3  # evaluations without a better validation NDCG@10 before stopping
    max_minutes: float = 0.0  # 0: no limit; else stop training after this wall time (evaluation follows)
    seed: int = 0
    log_every: int = 50
    time_phases: bool = False  # measure data / sparse / dense / loss / backward / optimizer time per step

    def __post_init__(self):
        if self.epochs < 1 or self.eval_every < 1 or self.patience < 1 or self.max_steps < 0 or self.max_minutes < 0:
            raise ConfigError("schedule.epochs, eval_every and patience must be >= 1, max_steps and max_minutes >= 0")


@dataclass
class EvalConfig:
    __pydantic_config__ = _STRICT_FIELDS

    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    filter_seen: bool = True
    bootstrap_samples: int = 1000
    score_block_rows: int = 65536  # items scored at a time against a batch of users (memory: batch x this)
    # Evaluate a fixed sample of this fraction of the users (by a hash of the user index: the same
    # users at any world size); at 10^8 items each user costs 1.3e10 FLOPs at hidden 64.
    user_fraction: float = 1.0
    # Semantic-ID models (loss.main=semantic_id): the beam of the constrained beam search. Its
    # lists certify ranks below beam_width - 1, so HR@k and NDCG@k are reported for k < beam_width.
    beam_width: int = 20

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1 or self.bootstrap_samples < 1:
            raise ConfigError("eval.ks must be a non-empty list of cut-offs >= 1, eval.bootstrap_samples >= 1")
        if self.score_block_rows < 1:
            raise ConfigError("eval.score_block_rows must be >= 1")
        if self.beam_width < 2:
            raise ConfigError(f"eval.beam_width must be >= 2, got {self.beam_width}")
        if not 0 < self.user_fraction <= 1:
            raise ConfigError(f"eval.user_fraction must be in (0, 1], got {self.user_fraction}")


@dataclass
class OutputConfig:
    __pydantic_config__ = _STRICT_FIELDS

    dir: str = "runs/default"
    metrics_port: int = 0  # Prometheus exporter on metrics_host:(port + global rank); 0 = off
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 so that a cluster's Prometheus can reach every node
    tensorboard: bool = False  # rank 0 writes scalars to DIR/tensorboard


@dataclass
class CheckpointConfig:
    __pydantic_config__ = _STRICT_FIELDS

    dir: str = ""  # default: OUTPUT/checkpoints
    every_steps: int = 0  # also checkpoint every N steps within an epoch; 0: at evaluations only
    keep: int = 2  # newest checkpoints kept, besides the one with the best validation metric
    preemption_deadline_s: float = 60.0  # after SIGTERM: checkpoint and exit within this time

    def __post_init__(self):
        if self.every_steps < 0 or self.keep < 1 or self.preemption_deadline_s <= 0:
            raise ConfigError("checkpoint.every_steps must be >= 0, keep >= 1, preemption_deadline_s > 0")


NEGATIVE_SAMPLERS = ("uniform", "popularity")


@dataclass
class LossConfig:
    """What training minimises: ``main``, a next-item objective, plus ``auxiliary`` objectives
    with their weights (train.objectives.REGISTRY holds the names)."""

    __pydantic_config__ = _STRICT_FIELDS

    # auto: full up to 99,999 items, full_sharded (on 2+ ranks) up to full_softmax_max_items,
    # sampled with mixed negatives above (train.objectives.choose_main).
    main: str = "auto"
    auxiliary: dict[str, float] = field(default_factory=dict)  # e.g. {action: 0.5}
    num_negatives: int = 1024  # sampled: negatives from the proposal, shared by a step's positions
    in_batch_negatives: int = 1024  # sampled: also this many of the step's own targets (0: none)
    full_softmax_max_items: int = 1_048_576  # auto: above this many items, sampled softmax
    negative_sampler: str = "uniform"  # sampled, bce: uniform over the trained items, or popularity (count + 1)
    positive_action_min: float = 4.0  # action: a raw action value >= this is positive (a rating of 4 or 5, say)
    score_block_rows: int = 8192  # full_sharded: item rows scored at a time (memory: 4 B x all positions x this)
    # What a step's summed token losses are divided by: the mean tokens per step so far
    # (running: every token weighs the same, however its batch was bucketed) or the step's own
    # tokens (step: a per-token mean per step). See train.objectives.LossNormaliser.
    normaliser: str = "running"

    def __post_init__(self):
        from train.objectives import REGISTRY, LossNormaliser

        main = REGISTRY.get(self.main)
        if self.main != "auto" and (main is None or not main.predicts_next_item):
            names = ["auto", *sorted(n for n, o in REGISTRY.items() if o.predicts_next_item)]
            raise ConfigError(f"loss.main must be a next-item objective, one of {names}, got {self.main!r}")
        for name, weight in self.auxiliary.items():
            if name not in REGISTRY or name == self.main:
                raise ConfigError(
                    f"loss.auxiliary.{name}: not an objective besides loss.main ({self.main}); objectives: "
                    f"{sorted(REGISTRY)}"
                )
            if not weight > 0:
                raise ConfigError(f"loss.auxiliary.{name}: the weight must be > 0, got {weight}")
        if self.negative_sampler not in NEGATIVE_SAMPLERS:
            raise ConfigError(
                f"loss.negative_sampler must be one of {NEGATIVE_SAMPLERS}, got {self.negative_sampler!r}"
            )
        if self.normaliser not in LossNormaliser.KINDS:
            raise ConfigError(f"loss.normaliser must be one of {LossNormaliser.KINDS}, got {self.normaliser!r}")
        if self.num_negatives < 1 or self.in_batch_negatives < 0 or self.full_softmax_max_items < 1:
            raise ConfigError(
                "loss.num_negatives and loss.full_softmax_max_items must be >= 1, loss.in_batch_negatives >= 0"
            )
        if self.score_block_rows < 1:
            raise ConfigError("loss.score_block_rows must be >= 1")


@dataclass
class Config:
    __pydantic_config__ = _STRICT_FIELDS

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        # A head nothing trains, or an objective without its head, is a mistake in the recipe.
        if self.model.action_head != ("action" in self.loss.auxiliary):
            raise ConfigError(
                "model.action_head and the 'action' objective go together: set model.action_head=true and "
                "loss.auxiliary.action=WEIGHT (0.5 in the recipes), or neither"
            )
        if self.model.semantic_id_head != (self.loss.main == "semantic_id"):
            raise ConfigError(
                "model.semantic_id_head and loss.main=semantic_id go together: the code decoder is what the "
                "semantic_id objective trains, and it scores no item vectors"
            )
        if self.loss.main == "semantic_id" and self.eval.beam_width <= 10:
            raise ConfigError(
                f"eval.beam_width {self.eval.beam_width}: validation picks the best model by NDCG@10, which a beam "
                "of at least 11 certifies"
            )
        if self.loss.main == "full_sharded" and self.parallel.sharding == "column_wise":
            raise ConfigError(
                "loss.main=full_sharded scores the item rows each rank owns: it needs parallel.sharding row_wise "
                "or table_wise, not column_wise"
            )

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output.dir) / "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def deepspeed_config(self) -> dict:
        return {
            "train_micro_batch_size_per_gpu": self.data.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.optim.grad_clip,
            "zero_optimization": {
                "stage": self.parallel.zero_stage,
                "reduce_bucket_size": self.parallel.bucket_elements,
                "allgather_bucket_size": self.parallel.bucket_elements,
                "stage3_prefetch_bucket_size": self.parallel.bucket_elements,
                "stage3_max_live_parameters": 2 * self.parallel.bucket_elements,
                "stage3_max_reuse_distance": 2 * self.parallel.bucket_elements,
            },
            "bf16": {"enabled": self.parallel.precision == "bf16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }


# Where the fields of the model section went when the objectives became their own section.
MOVED = {
    "model.loss": "it is loss.main now",
    "model.num_negatives": "it is loss.num_negatives now",
    "model.negative_sampler": "it is loss.negative_sampler now",
    "model.action_loss_weight": "it is loss.auxiliary.action now (with model.action_head)",
    "model.positive_action_min": "it is loss.positive_action_min now",
}


def _apply_override(tree: dict, assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects a.b=value, got {assignment!r}")
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for assignment in overrides:
        _apply_override(tree, assignment)
    tree.setdefault("data", {})
    return config_from_dict(tree)


def config_from_dict(values: dict) -> Config:
    try:
        return parse(Config, values, MOVED)
    except TypedConfigError as e:
        raise ConfigError(str(e)) from None


def upgrade_saved_config(values: dict) -> dict:
    """A resolved config as saved before the objectives had their own section (checkpoint format
    1, saved models with a meta.json): the objective fields move from model to loss."""
    values = {section: dict(fields) if isinstance(fields, dict) else fields for section, fields in values.items()}
    if "loss" in values:
        return values
    model = values.get("model", {})
    retired = {k: model.pop(k) for k in RETIRED_FIELDS if k in model}
    loss = {"main": retired.get("loss", "full")}
    for name in ("num_negatives", "negative_sampler", "positive_action_min"):
        if name in retired:
            loss[name] = retired[name]
    if model.get("action_head"):
        loss["auxiliary"] = {"action": retired.get("action_loss_weight", 0.5)}
    values["loss"] = dataclasses.asdict(LossConfig(**loss))
    return values
