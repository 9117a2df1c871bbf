"""A reward head on any encoder/decoder backbone with a chosen pooling, loadable with the Auto classes.

Hugging Face's ``*ForSequenceClassification`` heads pool one way per architecture (BERT: the [CLS]
token through an extra pooler layer; GPT-2/Llama: the last token). Backbones trained for
sentence embeddings, such as all-MiniLM-L6-v2, were trained with *mean* pooling, and with little
preference data a reward head on the mean-pooled embedding learns much faster. ``PooledRewardModel``
is ``AutoModel`` backbone → pooling (``mean`` | ``cls`` | ``last``) → dropout → one linear logit.

Importing this module registers the model type ``l3m_pooled_reward`` with ``AutoConfig`` and
``AutoModelForSequenceClassification``, so an exported folder loads with
``AutoModelForSequenceClassification.from_pretrained(path)`` (the ``reward_model`` constraint
imports it before loading). It lives with the constraints, which load it, and the reward-model
trainer (``l3m_lightning.reward``) builds on it from there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("mean", "cls", "last")


class PooledRewardConfig(PretrainedConfig):
    model_type = "l3m_pooled_reward"

    def __init__(self, backbone: dict[str, Any] | None = None, pooling: str = "mean", classifier_dropout: float = 0.0, initializer_range: float = 0.02, **kwargs: Any) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        kwargs.setdefault("num_labels", 1)
        super().__init__(**kwargs)
        self.backbone = dict(backbone or {})
        self.pooling, self.classifier_dropout, self.initializer_range = pooling, classifier_dropout, initializer_range

    def backbone_config(self) -> PretrainedConfig:
        if "model_type" not in self.backbone:
            raise ValueError("PooledRewardConfig.backbone must be a backbone config dict with a 'model_type'")
        spec = dict(self.backbone)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)


class PooledRewardModel(PreTrainedModel):
    config_class = PooledRewardConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True

    def __init__(self, config: PooledRewardConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config())
        if getattr(self.backbone, "pooler", None) is not None:  # BERT-style pooler: unused here, so never trained
            self.backbone.pooler.requires_grad_(False)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.score = nn.Linear(self.backbone.config.hidden_size, config.num_labels)
        nn.init.normal_(self.score.weight, std=config.initializer_range)
        nn.init.zeros_(self.score.bias)
        self.post_init()

    @classmethod
    def from_backbone(cls, name_or_path: str, pooling: str = "mean", classifier_dropout: float = 0.0, **kwargs: Any) -> "PooledRewardModel":
        """A pretrained backbone (``AutoModel``) with a fresh one-logit head."""
        kwargs.setdefault("trust_remote_code", False)  # never transformers' interactive prompt; RewardModelModule passes its option
        backbone = AutoModel.from_pretrained(name_or_path, **kwargs)
        config = PooledRewardConfig(backbone=backbone.config.to_dict(), pooling=pooling, classifier_dropout=classifier_dropout)
        if getattr(backbone.config, "pad_token_id", None) is not None:
            config.pad_token_id = backbone.config.pad_token_id
        return cls(config, backbone=backbone)

    def _init_weights(self, module: nn.Module) -> None:
        # Only the head is ours; the backbone's own modules are initialised by its class when built from config.
        if module is getattr(self, "score", None):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs, **kwargs).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if self.config.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        elif self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # the last non-padding token, whichever side was padded
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (attention_mask.to(torch.long) * positions).argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.score(self.dropout(pooled))
        loss = None
        if labels is not None:  # regression on the logit, as *ForSequenceClassification does for num_labels=1
            loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(PooledRewardConfig.model_type, PooledRewardConfig, exist_ok=True)
AutoModelForSequenceClassification.register(PooledRewardConfig, PooledRewardModel, exist_ok=True)
