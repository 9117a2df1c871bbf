"""The policy trainer's option groups: ``model.policy``, ``model.sampling``, ``model.barrier``, ...

Each group is a frozen dataclass; ``L3MModule`` takes one of each, and LightningCLI (jsonargparse)
parses them as nested groups, from YAML (``model: {barrier: {mu_floor: 0.1}}``) or the command line
(``--model.barrier.mu_floor 0.1``); ``python cli.py fit --help`` lists each group with its fields'
docs. Every group checks its own ranges when it is built, and an error names the full YAML key
(``model.barrier.mu_floor must be ...``). Checks that read two groups stay in ``L3MModule``.

The keys were flat until issue 13 (``model.mu_floor``). ``MOVED_KEYS`` maps each old key to its new
place and ``moved_key_errors`` finds old keys in a config or on the command line, so an old config
fails in one line that says where the key went, before anything is parsed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

__all__ = [
    "BarrierArgs", "EvaluationArgs", "MOVED_KEYS", "MultiplierArgs", "OptimizerArgs", "PolicyArgs", "SamplingArgs",
    "L3MOptions", "ValueBaselineArgs", "as_group", "check_moved_keys", "upgrade_hparams", "moved_key_errors", "moved_keys_in_argv", "moved_keys_in_config",
]

METHODS = ("barrier", "lagrangian", "penalty")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class _Group:
    """Shared by the groups: ``KEY`` is the group's YAML key; ``validate`` runs on construction."""

    KEY: ClassVar[str] = "model"

    def __post_init__(self) -> None:
        self.validate(self.KEY)

    def validate(self, where: str) -> None:  # pragma: no cover - every group overrides it
        pass

    @staticmethod
    def _need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists): what hparams.yaml and checkpoints store."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class PolicyArgs(_Group):
    """The policy: which causal LM, how it is loaded and how it trains (``model.policy``).

    Args:
        name_or_path: ``embedded`` (the small offline default), a Hugging Face causal LM (hub name or
            folder), a ``.gguf`` file or ``pkg:<module>/<file>.gguf`` (dequantised once, cached).
        tokenizer_name_or_path: defaults to ``name_or_path``; the data is tokenised with the same one.
        config: config overrides (for ``embedded``: its size, e.g. ``{hidden_size: 256}``).
        torch_dtype: the weights' dtype (``float32``, ``bfloat16``, ``float16``); null: the checkpoint's.
        trust_remote_code: allow a model or tokenizer folder whose ``auto_map`` names code shipped with
            it (default false: such a folder fails at once). The data's tokenizer follows it.
        init_seed: seed of the embedded model's random init.
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
        fused_forward: reference and sampled sequences in one padding-free (packed) forward/backward;
            checked once against two padded passes (to the rounding of the dtype the model computes
            in), which it falls back to for a model that ignores packed position ids.
        share_prompts: score each prompt once for its reference and its K samples (two forward
            calls: the prompts with their references, then the samples on the prompts' keys/values,
            gradients through them) whenever that computes fewer positions than the packed or padded
            pass; checked once against padded passes. Off under gradient checkpointing.
        scored_logits_only: logits for the scored tokens only (the output layer on their hidden
            states), once a batch shows the model's logits are that layer; false: every position's.
        cudnn_attention: let scaled-dot-product attention use cuDNN's kernels, which PyTorch prefers on
            Hopper GPUs but which build a plan for every new shape (hundreds of ms; an RL step meets new
            shapes at every decode step): false keeps flash / memory-efficient / math (attention.py).
        lora: PEFT ``LoraConfig`` fields (e.g. ``{r: 16, lora_alpha: 32}``): train LoRA adapters only.
        merge_lora_on_export: export a plain merged model (true) or just the adapters.
    """

    KEY: ClassVar[str] = "model.policy"
    name_or_path: str = "embedded"
    tokenizer_name_or_path: str | None = None
    config: dict[str, Any] | None = None
    torch_dtype: str | None = None
    trust_remote_code: bool = False
    init_seed: int = 0
    gradient_checkpointing: bool = False
    fused_forward: bool = True
    share_prompts: bool = True
    scored_logits_only: bool = True
    cudnn_attention: bool = False
    lora: dict[str, Any] | None = None
    merge_lora_on_export: bool = True

    def validate(self, where: str) -> None:
        import torch

        dtype = self.torch_dtype
        self._need(dtype is None or isinstance(getattr(torch, str(dtype), None), torch.dtype),
                   f"{where}.torch_dtype must be a torch dtype name such as float32, bfloat16 or float16, got {dtype!r}")
        self._need(isinstance(self.name_or_path, str) and bool(self.name_or_path.strip()),
                   f"{where}.name_or_path must name a model, got {self.name_or_path!r}")


@dataclass(frozen=True)
class SamplingArgs(_Group):
    """How responses are sampled from the policy during training (``model.sampling``).

    Args:
        num_samples: K responses per prompt (K >= 2 enables the leave-one-out baseline).
        max_new_tokens: sampled responses are cut at this many tokens.
        generation_batch_size: at most this many sequences decoded at once (bounds the KV cache);
            null: all B·K.
        temperature: keep 1.0 (with top_k 0 and top_p 1.0) for an unbiased constraint gradient.
        top_k: sample among the k most likely tokens (0 = off).
        top_p: nucleus sampling (1.0 = off).
        min_new_tokens: stop tokens are masked out until a response has this many tokens (as
            ``generate``'s ``min_new_tokens``; 0 = off). Benchmarks pin lengths with it; it biases
            a length constraint, so leave it at 0 for training.
        decoder: ``lean`` (each prompt prefilled once and its KV cache shared by its K samples,
            keys/values written in place, one uniform draw per token: ``l3m_lightning.decoding``) or
            ``generate`` (transformers' ``generate``). Both sample the same distribution; models
            ``lean`` cannot run, and lock-step decoding across ranks under FSDP1, use ``generate``.
        onednn: with ``lean`` on CPU, a decode step multiplies float32 weights of >= 300,000
            elements (SmolLM2's; none of the embedded model's) with oneDNN, 2-2.6x faster than
            ``F.linear`` for its few rows (``l3m_lightning.decoding``); it rounds differently, so the
            same seed gives other tokens. ``false``: ``F.linear``, as before commit ce5b6d2
            (2026-11-29); the frozen configs of results recorded with ``lean`` before it pin it.
        cuda_graphs: with ``lean`` on a GPU, each decode step over a fixed window (prompt + max_new_tokens,
            unwritten positions masked), captured once per sampling call as a CUDA graph and replayed per
            token: one launch per token instead of a few hundred. Not yet measured on a GPU.
    """

    KEY: ClassVar[str] = "model.sampling"
    num_samples: int = 2
    max_new_tokens: int = 64
    generation_batch_size: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    decoder: str = "lean"
    onednn: bool = True
    cuda_graphs: bool = False

    def validate(self, where: str) -> None:
        self._need(_integer(self.num_samples) and self.num_samples >= 1, f"{where}.num_samples must be >= 1, got {self.num_samples!r}")
        self._need(_integer(self.max_new_tokens) and self.max_new_tokens >= 1, f"{where}.max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        self._need(self.generation_batch_size is None or (_integer(self.generation_batch_size) and self.generation_batch_size >= 1),
                   f"{where}.generation_batch_size must be >= 1 sequences (or null for all), got {self.generation_batch_size!r}")
        self._need(_number(self.temperature) and self.temperature > 0, f"{where}.temperature must be > 0, got {self.temperature!r}")
        self._need(_integer(self.top_k) and self.top_k >= 0, f"{where}.top_k must be >= 0 (0 = off), got {self.top_k!r}")
        self._need(_number(self.top_p) and 0 < self.top_p <= 1, f"{where}.top_p must be in (0, 1], got {self.top_p!r}")
        self._need(_integer(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
                   f"{where}.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens!r}")
        self._need(self.decoder in DECODERS, f"{where}.decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        self._need(isinstance(self.onednn, bool), f"{where}.onednn must be true or false, got {self.onednn!r}")
        self._need(isinstance(self.cuda_graphs, bool), f"{where}.cuda_graphs must be true or false, got {self.cuda_graphs!r}")


#: ``model.sampling.decoder`` choices (``sampling.sample_rollouts``).
DECODERS = ("lean", "generate")


@dataclass(frozen=True)
class BarrierArgs(_Group):
    """The relaxed log-barrier's μ schedule and when it starts (``model.barrier``).

    Args:
        mu_start: μ at the start (a gentle barrier).
        mu_floor: μ never decays below this; the barrier settles about μ/λ inside the bound.
        mu_decay: μ ← max(mu_floor, mu_decay · μ) every ``mu_decay_every`` optimiser steps.
        mu_decay_every: optimiser steps between two decays.
        warmup_steps: optimiser steps of plain SFT (no sampling) before the constraints and μ's
            schedule start (0: the paper's one stage). For a policy trained from random init.
        infeasibility_patience: warn once when a constraint stays this many steps in the barrier's
            linear region (likely infeasible); 0 disables.
    """

    KEY: ClassVar[str] = "model.barrier"
    mu_start: float = 1.0
    mu_floor: float = 0.01
    mu_decay: float = 0.9
    mu_decay_every: int = 10
    warmup_steps: int = 0
    infeasibility_patience: int = 200

    def validate(self, where: str) -> None:
        for key in ("mu_start", "mu_floor"):
            value = getattr(self, key)
            self._need(_number(value) and value > 0, f"{where}.{key} must be a finite number > 0, got {value!r}")
        self._need(self.mu_floor <= self.mu_start, f"{where}.mu_floor ({self.mu_floor:g}) must be <= {where}.mu_start "
                                                    f"({self.mu_start:g}): μ decays from mu_start down to mu_floor")
        self._need(_number(self.mu_decay) and 0 < self.mu_decay <= 1, f"{where}.mu_decay must be in (0, 1] (μ ← mu_decay·μ), got {self.mu_decay!r}")
        self._need(_integer(self.mu_decay_every) and self.mu_decay_every >= 1,
                   f"{where}.mu_decay_every must be a positive number of steps, got {self.mu_decay_every!r}")
        self._need(_integer(self.warmup_steps) and self.warmup_steps >= 0,
                   f"{where}.warmup_steps must be >= 0 optimiser steps, got {self.warmup_steps!r}")
        self._need(_integer(self.infeasibility_patience) and self.infeasibility_patience >= 0,
                   f"{where}.infeasibility_patience must be >= 0 steps (0 = off), got {self.infeasibility_patience!r}")


@dataclass(frozen=True)
class MultiplierArgs(_Group):
    """How each constraint's multiplier λ is set from its estimate Ĉ (``model.multipliers``).

    Args:
        method: ``barrier`` (L3M: λ = B'_μ(Ĉ)/k), ``lagrangian`` (the paper's MM baseline:
            λ ← max(0, λ + dual_lr·Ĉ)) or ``penalty`` (fixed ``penalty_weights``).
        dual_lr: the Lagrangian's dual step size.
        dual_init: the Lagrangian's starting λ, one number or one per constraint.
        penalty_weights: the penalty method's fixed weights, one per constraint.
        ema: EMA of Ĉ before λ is read off (0 = off; our option, not the paper's).
    """

    KEY: ClassVar[str] = "model.multipliers"
    method: str = "barrier"
    dual_lr: float = 0.1
    dual_init: float | list[float] = 0.0
    penalty_weights: list[float] | None = None
    ema: float = 0.0

    def validate(self, where: str) -> None:
        self._need(self.method in METHODS, f"{where}.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self._need(_number(self.dual_lr) and (self.method != "lagrangian" or self.dual_lr > 0),
                   f"{where}.dual_lr must be > 0 for method 'lagrangian', got {self.dual_lr!r}")
        values = self.dual_init if isinstance(self.dual_init, (list, tuple)) else [self.dual_init]
        self._need(all(_number(v) and v >= 0 for v in values), f"{where}.dual_init must be >= 0, got {self.dual_init!r}")
        self._need(self.method != "penalty" or self.penalty_weights is not None,
                   f"{where}.penalty_weights is required for method 'penalty' (one weight per constraint)")
        self._need(self.penalty_weights is None or all(_number(v) for v in self.penalty_weights),
                   f"{where}.penalty_weights must be finite numbers, got {self.penalty_weights!r}")
        self._need(_number(self.ema) and 0 <= self.ema < 1, f"{where}.ema must be in [0, 1) (0 = off), got {self.ema!r}")


@dataclass(frozen=True)
class ValueBaselineArgs(_Group):
    """An optional learned per-token baseline V(x, y_<t) − V(x) added to the leave-one-out one (``model.value_baseline``).

    Args:
        enabled: add the baseline (still unbiased; tokens whose prefix already fixed the cost get
            advantage ≈ 0). Our option.
        lr: the value head's own AdamW learning rate, apart from the policy's.
        width: 0 = a linear head; otherwise one hidden layer (GELU) of this width.
        gae_lambda: 1 = Monte-Carlo advantages (unbiased); < 1 = GAE(λ), less variance but biased by
            V's error (needs ``enabled``).
    """

    KEY: ClassVar[str] = "model.value_baseline"
    enabled: bool = False
    lr: float = 1e-2
    width: int = 0
    gae_lambda: float = 1.0

    def validate(self, where: str) -> None:
        self._need(_number(self.lr) and self.lr > 0, f"{where}.lr must be > 0, got {self.lr!r}")
        self._need(_integer(self.width) and self.width >= 0, f"{where}.width must be >= 0 (0 = a linear head), got {self.width!r}")
        self._need(_number(self.gae_lambda) and 0 <= self.gae_lambda <= 1, f"{where}.gae_lambda must be in [0, 1], got {self.gae_lambda!r}")
        self._need(self.gae_lambda == 1 or self.enabled,
                   f"{where}.gae_lambda={self.gae_lambda:g} needs {where}.enabled: true (GAE bootstraps from V)")


@dataclass(frozen=True)
class OptimizerArgs(_Group):
    """AdamW with linear warm-up, then cosine decay (``model.optimizer``).

    Args:
        learning_rate: the policy's peak learning rate.
        weight_decay: AdamW weight decay (matrices only; biases and norms get none).
        betas: AdamW's (β1, β2).
        warmup_ratio: share of the optimiser steps spent warming up linearly.
        min_lr_ratio: the cosine ends at this fraction of the learning rate.
        fused: torch's fused AdamW kernel (one pass over each parameter instead of one per
            operation; on CPU and CUDA). Runs recorded before 2026-11-29 used the per-tensor loop:
            ``false`` reproduces them. Not under fp16 mixed precision, whose loss scaling the fused
            step would undo only after gradient clipping had seen scaled gradients.
    """

    KEY: ClassVar[str] = "model.optimizer"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    fused: bool = True

    def validate(self, where: str) -> None:
        self._need(isinstance(self.fused, bool), f"{where}.fused must be true or false, got {self.fused!r}")
        self._need(_number(self.learning_rate) and self.learning_rate > 0, f"{where}.learning_rate must be > 0, got {self.learning_rate!r}")
        self._need(_number(self.weight_decay) and self.weight_decay >= 0, f"{where}.weight_decay must be >= 0, got {self.weight_decay!r}")
        betas = self.betas
        self._need(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas),
                   f"{where}.betas must be two numbers in [0, 1), got {betas!r}")
        self._need(_number(self.warmup_ratio) and 0 <= self.warmup_ratio <= 1, f"{where}.warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        self._need(_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, f"{where}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass(frozen=True)
class EvaluationArgs(_Group):
    """Validation and test passes, and the samples logged while training (``model.evaluation``).

    Args:
        generate: sample responses to held-out prompts in validation/test and report constraint values.
        num_samples: responses sampled per held-out prompt; each prompt's values are averaged, so the
            reported confidence intervals are over prompts.
        log_samples_every_n_steps: how often sampled prompt/response pairs go to TensorBoard as text (0 = never).
    """

    KEY: ClassVar[str] = "model.evaluation"
    generate: bool = True
    num_samples: int = 1
    log_samples_every_n_steps: int = 50

    def validate(self, where: str) -> None:
        self._need(_integer(self.num_samples) and self.num_samples >= 1, f"{where}.num_samples must be >= 1, got {self.num_samples!r}")
        self._need(_integer(self.log_samples_every_n_steps) and self.log_samples_every_n_steps >= 0,
                   f"{where}.log_samples_every_n_steps must be >= 0 (0 = off), got {self.log_samples_every_n_steps!r}")


GROUPS: dict[str, type[_Group]] = {
    "policy": PolicyArgs, "sampling": SamplingArgs, "barrier": BarrierArgs, "multipliers": MultiplierArgs,
    "value_baseline": ValueBaselineArgs, "optimizer": OptimizerArgs, "evaluation": EvaluationArgs,
}


def as_group(cls: type, value: Any) -> Any:
    """``value`` as a ``cls`` instance: ``None`` → the defaults, a mapping → ``cls(**mapping)`` (from hparams or Python)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{cls.KEY}: unknown option {unknown[0]!r}; expected one of {', '.join(sorted(names))}")
        kwargs = dict(value)
        if "betas" in kwargs and isinstance(kwargs["betas"], list):
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)
    raise TypeError(f"{cls.KEY} must be a {cls.__name__} or a mapping of its options, got {type(value).__name__}")


# --- keys that moved in issue 13 --------------------------------------------------------------------
#: Each old flat key of ``model`` and its new place (both without the ``model.`` prefix).
MOVED_KEYS: dict[str, str] = {
    "model_name_or_path": "policy.name_or_path",
    "tokenizer_name_or_path": "policy.tokenizer_name_or_path",
    "model_config": "policy.config",
    "torch_dtype": "policy.torch_dtype",
    "trust_remote_code": "policy.trust_remote_code",
    "init_seed": "policy.init_seed",
    "gradient_checkpointing": "policy.gradient_checkpointing",
    "fused_forward": "policy.fused_forward",
    "lora": "policy.lora",
    "merge_lora_on_export": "policy.merge_lora_on_export",
    "num_samples": "sampling.num_samples",
    "max_new_tokens": "sampling.max_new_tokens",
    "generation_batch_size": "sampling.generation_batch_size",
    "temperature": "sampling.temperature",
    "top_k": "sampling.top_k",
    "top_p": "sampling.top_p",
    "mu_start": "barrier.mu_start",
    "mu_floor": "barrier.mu_floor",
    "mu_decay": "barrier.mu_decay",
    "mu_decay_every": "barrier.mu_decay_every",
    "constraint_warmup_steps": "barrier.warmup_steps",
    "infeasibility_patience": "barrier.infeasibility_patience",
    "method": "multipliers.method",
    "dual_lr": "multipliers.dual_lr",
    "dual_init": "multipliers.dual_init",
    "penalty_weights": "multipliers.penalty_weights",
    "constraint_ema": "multipliers.ema",
    "value_baseline": "value_baseline.enabled",  # only when given a true/false, not a mapping
    "value_head_lr": "value_baseline.lr",
    "value_head_width": "value_baseline.width",
    "gae_lambda": "value_baseline.gae_lambda",
    "learning_rate": "optimizer.learning_rate",
    "weight_decay": "optimizer.weight_decay",
    "betas": "optimizer.betas",
    "warmup_ratio": "optimizer.warmup_ratio",
    "min_lr_ratio": "optimizer.min_lr_ratio",
    "val_generate": "evaluation.generate",
    "eval_num_samples": "evaluation.num_samples",
    "log_samples_every_n_steps": "evaluation.log_samples_every_n_steps",
}

_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0", "null", "none")


def _moved(key: str, value: Any) -> str | None:
    """The new place of ``model.<key>`` if it moved (``value_baseline`` moved only as a flag), else None."""
    if key == "value_baseline" and (isinstance(value, Mapping) or value is _GROUP_OPTION):
        return None
    return MOVED_KEYS.get(key)


_GROUP_OPTION = object()  # ``--model.value_baseline <config file>``: the group itself


def moved_keys_in_config(config: Any) -> list[tuple[str, str]]:
    """``(old, new)`` full keys for each moved key under ``model`` in a parsed config (also under a subcommand)."""
    found: list[tuple[str, str]] = []
    if not isinstance(config, Mapping):
        return found
    models = [config.get("model")] + [sub.get("model") for name, sub in config.items() if name in _SUBCOMMANDS and isinstance(sub, Mapping)]
    for model in models:
        if isinstance(model, Mapping) and isinstance(model.get("init_args"), Mapping):
            model = model["init_args"]
        if not isinstance(model, Mapping):
            continue
        for key, value in model.items():
            new = _moved(key, value)
            if new is not None:
                found.append((f"model.{key}", f"model.{new}"))
    return found


def moved_keys_in_argv(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``(old, new)`` full keys for each ``--model.<old key>`` option on the command line."""
    found: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--model."):
            continue
        name, eq, inline = arg[2:].partition("=")
        key = name[len("model."):]
        if "." in key:
            continue
        value: Any = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if key == "value_baseline" and str(value).strip().lower() not in _BOOL_WORDS:
            value = _GROUP_OPTION  # a config file or mapping for the new group
        new = _moved(key, value)
        if new is not None:
            found.append((f"model.{key}", f"model.{new}"))
    return found


def _config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def moved_key_errors(argv: Sequence[str]) -> list[str]:
    """One message per moved key in the config files and options of ``argv``: ``<file>: model.mu_floor moved to model.barrier.mu_floor``.

    Run before the CLI parses anything; a file that cannot be read is left to the parser to report.
    """
    import yaml

    messages = []
    for path in _config_files(argv):
        try:
            config = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        messages += [f"{path}: {old} moved to {new}" for old, new in moved_keys_in_config(config)]
    messages += [f"command line: {old} moved to {new}" for old, new in moved_keys_in_argv(argv)]
    return messages


def upgrade_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved ``L3MModule`` hyperparameters with the flat keys of before issue 13 moved into their groups."""
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        new = _moved(key, value)
        if new is None:
            out[key] = value
            continue
        group, field = new.split(".")
        target = out.setdefault(group, {})
        if isinstance(target, Mapping):
            target[field] = value
    return out


@dataclass
class L3MOptions:
    """All of ``L3MModule``'s options, typed (``module.options.barrier.mu_floor``); the groups are immutable, this holder is not."""

    policy: PolicyArgs
    constraints: list[Any]
    sft_loss_reduction: str
    sampling: SamplingArgs
    barrier: BarrierArgs
    multipliers: MultiplierArgs
    value_baseline: ValueBaselineArgs
    optimizer: OptimizerArgs
    evaluation: EvaluationArgs
    export_dir: str | None


def check_moved_keys(argv: Sequence[str]) -> None:
    """Raise a one-line ``ConfigError`` for the first moved key in ``argv``'s config files or options (see ``moved_key_errors``)."""
    from constraints.base import ConfigError

    messages = moved_key_errors(argv)
    if messages:
        raise ConfigError(messages[0])
