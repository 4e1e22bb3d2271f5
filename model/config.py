"""The model's configuration: which transformers decoder, how big, which input features, which
loss. Vocabulary sizes are not here: they come from the data's manifest."""

from __future__ import annotations

from dataclasses import dataclass, field

LOSSES = ("full", "sampled", "in_batch")
NEGATIVE_SAMPLERS = ("uniform", "popularity")


@dataclass
class ModelConfig:
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
    loss: str = "full"
    num_negatives: int = 1024  # for loss "sampled"
    negative_sampler: str = "uniform"
    action_head: bool = False  # predict the next event's action from (history, next item)
    action_loss_weight: float = 0.5
    positive_action_min: float = 4.0  # action head target: raw action value >= this (e.g. rating >= 4)
    backbone_options: dict = field(default_factory=dict)  # passed to the transformers config as is
    # The item representation, input token and scoring target alike: the sum of the parts enabled.
    # Text parts need shards prepared with --item-text. (The ID table is allocated either way.)
    item_id: bool = True  # a learned embedding per item ID
    item_text: bool = False  # a learned projection of the item's pretrained sentence-encoder vector
    item_text_tokens: bool = False  # the mean of learned embeddings of the item's hashed text tokens
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
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.negative_sampler not in NEGATIVE_SAMPLERS:
            raise ValueError(
                f"model.negative_sampler must be one of {NEGATIVE_SAMPLERS}, got {self.negative_sampler!r}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if min(self.hidden_size, self.num_layers, self.num_heads, self.max_len) < 1 or self.temperature <= 0:
            raise ValueError("model sizes must be positive and model.temperature > 0")
        if not 0 <= self.item_id_dropout < 1:
            raise ValueError(f"model.item_id_dropout must be in [0, 1), got {self.item_id_dropout}")
        if self.item_id_dropout and not (self.item_id and (self.item_text or self.item_text_tokens)):
            raise ValueError(
                "model.item_id_dropout needs model.item_id and a text part (item_text or item_text_tokens)"
            )
        if not (self.item_id or self.item_text or self.item_text_tokens):
            raise ValueError("model: at least one of item_id, item_text and item_text_tokens must be on")
        if self.loss == "sampled" and self.num_negatives < 1:
            raise ValueError("model.num_negatives must be >= 1 for the sampled loss")

    @property
    def uses_text(self) -> bool:
        return self.item_text or self.item_text_tokens

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
