"""The model's configuration.

``ModelConfig`` is the ``model`` section of a training recipe: which transformers decoder, how
big, which input features, how an item is represented. Architecture only: how the model is
trained (the objectives) is the training config's business, and vocabulary sizes come from the
data's manifest.

``RecommenderConfig`` is the transformers ``PreTrainedConfig`` of a built model: the
architecture plus the sizes it was built for (items, actions, time gaps, text) and the text
features its item vectors expect. ``save_pretrained`` writes it as ``config.json``; it is
registered with ``AutoConfig`` as model type ``lmrec`` (see model.modeling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

MODEL_TYPE = "lmrec"
# Fields that lived in the model section before the objectives became their own section; saved
# models, checkpoints and artifacts written then still carry them. They do not change the
# architecture, so reading an old model drops them (training maps them to the loss section).
RETIRED_FIELDS = ("loss", "num_negatives", "negative_sampler", "action_loss_weight", "positive_action_min")


@dataclass
class ModelConfig:
    # Parsed by pydantic in train.config (an attribute, not a field: model/ does not import it).
    __pydantic_config__ = {"extra": "forbid"}

    backbone: str = "llama"  # any transformers model_type whose base model takes inputs_embeds causally
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 0  # 0: 4 x hidden_size
    max_len: int = 200  # longest input history; longer ones keep their most recent events
    dropout: float = 0.1
    use_actions: bool = True  # add an action embedding to each input token, when the data has actions
    use_gaps: bool = True  # add a time-gap-bucket embedding, when the data has timestamps
    normalize: bool = True  # score by cosine similarity / temperature instead of dot product
    temperature: float = 0.05
    action_head: bool = False  # predict the next event's action from (history, next item)
    backbone_options: dict = field(default_factory=dict)  # passed to the transformers config as is
    # The item representation, input token and scoring target alike: the sum of the parts enabled
    # (model.items). Text parts need shards prepared with --item-text. Without item_id the model
    # has no table of the catalog's size.
    item_id: bool = True  # a learned embedding per item ID
    item_text: bool = False  # a learned projection of the item's pretrained sentence-encoder vector
    item_text_tokens: bool = False  # the mean of learned embeddings of the item's hashed text tokens
    # The mean of learned embeddings of the item's semantic-ID codes (one table row per code of
    # each level; shards given codes by `lmrec data semantic-ids`).
    item_semantic_ids: bool = False
    # Generate the next item's semantic ID level by level (model.semantic.CodeDecoder) instead of
    # scoring item vectors: goes with loss.main=semantic_id.
    semantic_id_head: bool = False
    # Training only: each step, leave out this fraction of the items' ID parts, so that the model
    # also learns to place an item by its text alone, as it must for a new item (DropoutNet).
    item_id_dropout: float = 0.0

    def __post_init__(self):
        from transformers import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if self.backbone not in CONFIG_MAPPING:
            raise ValueError(
                f"model.backbone: unknown transformers model type {self.backbone!r} (e.g. llama, qwen2, gpt2)"
            )
        if self.backbone not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"model.backbone: {self.backbone!r} is not a causal language model in transformers")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if min(self.hidden_size, self.num_layers, self.num_heads, self.max_len) < 1 or self.temperature <= 0:
            raise ValueError("model sizes must be positive and model.temperature > 0")
        if not 0 <= self.item_id_dropout < 1:
            raise ValueError(f"model.item_id_dropout must be in [0, 1), got {self.item_id_dropout}")
        if self.item_id_dropout and not (self.item_id and self.composed):
            raise ValueError(
                "model.item_id_dropout needs model.item_id and a content part (item_text, item_text_tokens or "
                "item_semantic_ids)"
            )
        if not (self.item_id or self.composed):
            raise ValueError(
                "model: at least one of item_id, item_text, item_text_tokens and item_semantic_ids must be on"
            )

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """A model section as saved by any lmrec version (retired fields dropped)."""
        return cls(**{k: v for k, v in values.items() if k not in RETIRED_FIELDS})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def uses_text(self) -> bool:
        return self.item_text or self.item_text_tokens

    @property
    def composed(self) -> bool:
        """An item vector has a content part besides (or instead of) its ID row: an item without
        training events is placed by its content."""
        return self.uses_text or self.item_semantic_ids

    @property
    def uses_semantic_ids(self) -> bool:
        return self.item_semantic_ids or self.semantic_id_head

    def backbone_config(self):
        """The transformers config of the backbone. Token embeddings are unused (we feed
        inputs_embeds), so the vocabulary is a single row."""
        from transformers import AutoConfig

        intermediate = self.intermediate_size or 4 * self.hidden_size
        config = AutoConfig.for_model(
            self.backbone,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=intermediate,
            max_position_embeddings=self.max_len + 1,
            vocab_size=1,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        # Names differ between families; set whichever this family has.
        for name, value in (
            ("num_key_value_heads", self.num_heads),
            ("is_decoder", True),  # encoder families that support it (BERT) become causal
            ("n_inner", intermediate),
            ("attention_dropout", self.dropout),
            ("attn_pdrop", self.dropout),
            ("resid_pdrop", self.dropout),
            ("embd_pdrop", self.dropout),
            ("hidden_dropout", self.dropout),
        ):
            if hasattr(config, name):
                setattr(config, name, value)
        for name, value in self.backbone_options.items():
            setattr(config, name, value)
        return config


@strict
class RecommenderConfig(PreTrainedConfig):
    """A built model: ``model`` is its ModelConfig as a dict (one definition of the architecture's
    fields), the rest the vocabulary it was built for."""

    model_type = MODEL_TYPE

    model: dict = field(default_factory=dict)
    num_items: int = 0
    num_actions: int = 0  # 0: the data had no actions
    num_gaps: int = 0  # 0: the data had no timestamps
    text_dim: int = 0  # width of the pretrained text vectors, for model.item_text
    # The text features the item vectors were built from (encoder and tokenizer fingerprints):
    # an item added from text must be encoded the same way.
    text: dict | None = None
    # The semantic IDs the code tables and the code decoder are sized for: {"level_sizes": [...]}
    # (model.semantic; data.semantic_ids describes the rest in the shards' manifest).
    semantic_ids: dict | None = None

    @classmethod
    def build(
        cls, model: ModelConfig, vocab: dict, text: dict | None = None, semantic_ids: dict | None = None
    ) -> RecommenderConfig:
        """From a ModelConfig and vocabulary sizes ``{"items", "actions", "gaps", "text_dim"}``;
        ``semantic_ids``: at least ``{"level_sizes": [...]}`` where the model uses them."""
        if model.uses_semantic_ids and not (semantic_ids and semantic_ids.get("level_sizes")):
            raise ValueError(
                "model.item_semantic_ids / semantic_id_head need items with semantic IDs (lmrec data semantic-ids)"
            )
        return cls(
            model=model.to_dict(),
            num_items=int(vocab["items"]),
            num_actions=int(vocab.get("actions", 0)),
            num_gaps=int(vocab.get("gaps", 0)),
            text_dim=int(vocab.get("text_dim", 0)),
            text=text,
            semantic_ids={"level_sizes": [int(c) for c in semantic_ids["level_sizes"]]}
            if model.uses_semantic_ids
            else None,
        )

    @property
    def architecture(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @property
    def level_sizes(self) -> list[int]:
        return list(self.semantic_ids["level_sizes"]) if self.semantic_ids else []

    @property
    def vocab(self) -> dict:
        return {"items": self.num_items, "actions": self.num_actions, "gaps": self.num_gaps, "text_dim": self.text_dim}
