"""Reward-model constraints: score (prompt, response) with any Hugging Face sequence-classification RM.

::

    constraints:
      - name: reward_model
        model_name_or_path: runs/rm-harmless/version_0/hf_model   # hub name or local folder
        threshold: 0.0          # in standardised units when calibrated, else in raw logits
        sense: at_least
        calibration_file: data/calibration.jsonl   # rows {"prompt", "response"}: standardise scores
      - name: harmlessness      # a preset: the same with a default public RM
        threshold: 0.5
      - name: my_rm             # an RM exported by `cli.py rm fit`: standardise with its held-out rewards
        model_name_or_path: runs/rm-harmless/version_0/hf_model
        calibration: held_out
        threshold: 0.45

The policy's completions are decoded to text (the training step does this), formatted with the
RM's own tokenizer (its chat template if it has one, else ``template``), scored in batches under
``torch.no_grad`` on the device ``setup`` was given, and read off the output logit ``output_index``.
"""

from __future__ import annotations

import json
import logging
import math
import string
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from constraints.base import ConfigError, Constraint, ConstraintConfigError, ConstraintError, Sense, _is_finite_number
from constraints.data_files import load_rows
from constraints.model_source import PACKAGE_PREFIX, check_no_custom_code, ensure_pad_token, pretrained_source, resolve_model_path  # noqa: F401  (re-exported)
from constraints.model_source import _hub_file, looks_like_local_path

log = logging.getLogger(__name__)

#: Anthropic HH formulation: a prompt that is itself an HH dialogue ("a\n\nAssistant: b\n\nHuman: c")
#: comes back out exactly as the dataset wrote it.
DEFAULT_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant: {response}"
INPUT_FORMATS = ("auto", "chat_template", "template", "pair")
#: Written next to an RM exported by ``RewardModelModule``: how its training text was formatted
#: (and the held-out reward statistics), so the constraint formats text the same way by default.
FORMAT_FILE = "l3m_reward_model.json"
FORMAT_DEFAULTS: dict[str, Any] = {"input_format": "auto", "template": DEFAULT_TEMPLATE, "max_length": 512, "truncation_side": "left"}
#: ``calibration: held_out``: standardise with the held-out reward mean/std in the RM folder's FORMAT_FILE.
HELD_OUT = "held_out"


def held_out_problem(spec_file: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """``(held_out entry, None)`` of an exported RM's FORMAT_FILE, or ``(None, what was found instead)``.

    Kept apart from raising so that construction (a local folder) and loading (a hub name or a
    ``pkg:`` folder) report the same problem in their own error type.
    """
    if spec_file is None or not spec_file.is_file():
        return None, "none" if spec_file is None or spec_file.parent.is_dir() else "none (no such folder)"
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"a file that is not valid JSON ({' '.join(str(err).split())[:120]})"
    held = spec.get(HELD_OUT) if isinstance(spec, dict) else None
    if not isinstance(held, dict) or not {"mean", "std"} <= set(held):
        return None, "a file without them" if held is None else f"{HELD_OUT}: {held!r:.120}"
    mean, std = held["mean"], held["std"]
    if not _is_finite_number(mean) or not _is_finite_number(std) or std <= 0:
        return None, f"mean {mean!r}, std {std!r} (the std must be a finite number > 0)"
    return held, None


def read_held_out_calibration(spec_file: Path | None, where: str, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """``{mean, std, source}`` from an exported RM's held-out reward statistics, or one ``error`` line saying what is missing.

    ``spec_file`` is the FORMAT_FILE the statistics should be in (None: a hub RM that has none).
    """
    held, problem = held_out_problem(spec_file)
    if problem is not None:
        shown = spec_file if spec_file is not None else FORMAT_FILE
        raise error(f"{where}: calibration: {HELD_OUT} needs {shown} with held-out reward mean/std "
                    f"(export the RM with `cli.py rm fit`), got {problem}")
    return {"mean": float(held["mean"]), "std": float(held["std"]), "source": str(spec_file)}


def format_for_reward_model(
    tokenizer: Any, prompt: str, response: str, input_format: str = "auto", template: str = DEFAULT_TEMPLATE
) -> tuple[str, str | None, bool]:
    """``(text, text_pair, add_special_tokens)`` to pass to the RM's tokenizer for one (prompt, response).

    ``auto`` is ``chat_template`` when the tokenizer has one, else ``template``. ``pair`` passes
    prompt and response as a text pair (cross-encoder RMs such as the OpenAssistant DeBERTa ones).
    Used both by the constraint and by the reward-model trainer, so an RM is scored the way it was trained.
    """
    if input_format == "auto":
        input_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "template"
    if input_format == "chat_template":
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False), None, False
    if input_format == "pair":
        return prompt, response, True
    if input_format == "template":
        return template.format(prompt=prompt, response=response), None, True
    raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")


def _register_l3m_model_types(path: str) -> None:
    """RMs exported with ``pooling: mean|cls|last`` have model type ``l3m_pooled_reward``: register it first."""
    config = Path(path) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (OSError, ValueError):
        return
    if model_type == "l3m_pooled_reward":
        import constraints.pooled_reward_model  # noqa: F401  (registers with the Auto classes)


def check_template(template: str, where: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: template {template!r} is not a valid format string: {err}") from None
    if fields != {"prompt", "response"}:
        raise ValueError(f"{where}: template must contain exactly the fields {{prompt}} and {{response}}, got {sorted(fields)} in {template!r}")


class RewardModelConstraint(Constraint):
    """Mean reward-model score of the sampled responses, "at_least" (default) or "at_most" ``threshold``.

    Args:
        threshold: in standardised units when a calibration is set (``(raw - mean)/std``), else in raw logits.
        model_name_or_path: a hub name or a local ``save_pretrained`` folder of an
            ``AutoModelForSequenceClassification`` (e.g. one exported by ``RewardModelModule``), or
            ``pkg:<module>`` for weights a Python package ships.
        tokenizer_name_or_path: defaults to ``model_name_or_path`` (the RM's own tokenizer, not the policy's).
        sense: ``at_least`` by default (higher reward is better).
        scale: the threshold's unit; defaults to 1.0 when a calibration is given (standardised
            scores are O(1)), otherwise required.
        input_format: ``auto`` (the RM tokenizer's chat template if it has one, else ``template``),
            ``chat_template``, ``template``, or ``pair`` (tokenizer(prompt, response) text pairs).
        template: a format string with ``{prompt}`` and ``{response}``; default the Anthropic HH
            formulation ``"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"``.
        max_length: tokens per text (default 512); longer texts lose tokens on ``truncation_side``
            (``left`` by default, keeping the response).
            These four formatting options, when not given, come from the ``l3m_reward_model.json``
            that ``RewardModelModule`` writes next to an RM it exports, so an RM is scored on text
            formatted as in its training; otherwise from the defaults above.
        batch_size: texts per forward pass.
        output_index: which output logit is the reward (0 for a ``num_labels=1`` RM).
        calibration: ``{mean, std}`` of raw scores: rewards become ``(raw - mean)/std``. Or
            ``held_out``: the held-out reward mean/std that ``cli.py rm fit`` recorded in the RM
            folder's ``l3m_reward_model.json`` (read at construction for a local folder, which
            fails at once if the file or the statistics are missing; at load for a hub name or
            ``pkg:``), so the threshold is in standard deviations of the RM's held-out rewards.
            Either way the numbers are kept in ``state_dict()``, so a resumed run reuses them.
        calibration_file: a local file of ``{prompt, response}`` rows (json/jsonl(.gz)/csv/parquet);
            at ``setup`` their raw scores give mean and std (at most ``calibration_max_rows`` rows).
            The result is kept in ``state_dict()``, so a resumed run reuses it.
        dtype: e.g. ``bfloat16`` for a large RM on GPU; default the checkpoint's.
        model_kwargs: more keyword arguments for ``from_pretrained``.
        trust_remote_code: allow an RM or tokenizer folder whose ``auto_map`` names Python code shipped
            with it. Default false: such a folder fails in one line — at once for a local folder, at
            load for a hub name — and nothing from it is imported.
    """

    registry_name = "reward_model"
    #: A preset's default RM; ``None`` here, so ``model_name_or_path`` is required.
    default_model: str | None = None

    def __init__(
        self,
        threshold: float,
        model_name_or_path: str | None = None,
        sense: Sense = "at_least",
        scale: float | None = None,
        name: str | None = None,
        tokenizer_name_or_path: str | None = None,
        input_format: Literal["auto", "chat_template", "template", "pair"] | None = None,
        template: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        truncation_side: Literal["left", "right"] | None = None,
        output_index: int = 0,
        calibration: dict[str, float] | Literal["held_out"] | None = None,
        calibration_file: str | None = None,
        calibration_max_rows: int | None = None,
        dtype: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        on_invalid: Literal["error", "drop"] = "error",
        trust_remote_code: bool = False,
    ) -> None:
        where = f"constraint '{name or self.registry_name}'"
        if calibration is not None and calibration_file is not None:
            raise ValueError(f"{where}: give either calibration ({{mean, std}} or {HELD_OUT}) or calibration_file, not both")
        if isinstance(calibration, str) and calibration != HELD_OUT:
            raise ValueError(f"{where}: calibration must be a mapping {{mean, std}} or '{HELD_OUT}', got {calibration!r}")
        if scale is None and self.default_scale is None and (calibration is not None or calibration_file is not None):
            scale = 1.0  # standardised rewards are O(1)
        super().__init__(threshold, sense=sense, scale=scale, name=name, on_invalid=on_invalid)
        where = f"constraint '{self.name}'"
        self.model_name_or_path = model_name_or_path or self.default_model
        if not self.model_name_or_path:
            raise ValueError(f"{where}: model_name_or_path is required (a hub name or a local save_pretrained folder)")
        self.tokenizer_name_or_path = tokenizer_name_or_path
        if input_format is not None and input_format not in INPUT_FORMATS:
            raise ValueError(f"{where}: input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if template is not None:
            check_template(template, where)
        for field, value in (("batch_size", batch_size), ("max_length", max_length)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{where}: {field} must be an integer >= 1, got {value!r}")
        if truncation_side is not None and truncation_side not in ("left", "right"):
            raise ValueError(f"{where}: truncation_side must be 'left' or 'right', got {truncation_side!r}")
        if not isinstance(output_index, int) or isinstance(output_index, bool) or output_index < 0:
            raise ValueError(f"{where}: output_index must be an integer >= 0, got {output_index!r}")
        if calibration_max_rows is not None and calibration_max_rows < 2:
            raise ValueError(f"{where}: calibration_max_rows must be >= 2, got {calibration_max_rows}")
        # None: the exported RM's own setting (FORMAT_FILE) if it has one, else FORMAT_DEFAULTS; fixed at load().
        self.input_format, self.template, self.max_length, self.truncation_side = input_format, template, max_length, truncation_side
        self.batch_size, self.output_index = batch_size, output_index
        #: "held_out" when the statistics come from the RM folder's FORMAT_FILE (filled in below or at load).
        self.calibration_source = HELD_OUT if calibration == HELD_OUT else None
        self.calibration = None if calibration is None or self.calibration_source else self._check_calibration(calibration)
        self.calibration_file, self.calibration_max_rows = calibration_file, calibration_max_rows
        if calibration_file is not None and not Path(calibration_file).expanduser().is_file():
            raise ValueError(f"{where}: calibration_file '{calibration_file}' does not exist")
        self.dtype, self.model_kwargs = dtype, dict(model_kwargs or {})
        if "trust_remote_code" in self.model_kwargs:
            raise ValueError(f"{where}: model_kwargs cannot hold trust_remote_code; set trust_remote_code on the constraint instead")
        self.trust_remote_code = bool(trust_remote_code)
        for option, source in (("model_name_or_path", self.model_name_or_path), ("tokenizer_name_or_path", tokenizer_name_or_path)):
            if isinstance(source, str) and Path(source).expanduser().is_dir():  # a local folder: refuse custom code now, not at setup
                check_no_custom_code(source, f"{where}: {option}", self.trust_remote_code, "trust_remote_code")
        if self.calibration_source == HELD_OUT and self._is_local(self.model_name_or_path):
            self.calibration = read_held_out_calibration(Path(self.model_name_or_path).expanduser() / FORMAT_FILE, where)
        self.device = torch.device("cpu")
        self.model: Any = None
        self.tokenizer: Any = None

    @staticmethod
    def _is_local(source: str) -> bool:
        """A local folder (or a path meant as one): its held-out statistics are checked at construction, before training."""
        return isinstance(source, str) and (Path(source).expanduser().is_dir() or looks_like_local_path(source))

    # --- loading ----------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the RM and its tokenizer (once; ``setup`` and the first ``score`` call it)."""
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        where = f"constraint '{self.name}'"
        try:
            path = pretrained_source(self.model_name_or_path, "model_name_or_path", self.trust_remote_code, "trust_remote_code")
            tokenizer_option = "tokenizer_name_or_path" if self.tokenizer_name_or_path else "model_name_or_path"
            tokenizer_path = pretrained_source(self.tokenizer_name_or_path or self.model_name_or_path, tokenizer_option,
                                               self.trust_remote_code, "trust_remote_code")
        except ConfigError as err:
            raise ConstraintConfigError(f"{where}: could not load reward model: {err}") from None
        kwargs = dict(self.model_kwargs)
        if self.dtype is not None:
            if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
                raise ValueError(f"{where}: dtype '{self.dtype}' is not a torch dtype (e.g. float32, bfloat16)")
            kwargs["dtype"] = getattr(torch, self.dtype)
        _register_l3m_model_types(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=self.trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=self.trust_remote_code, **kwargs)
        except (OSError, ValueError) as err:
            message = " ".join(str(err).split())[:300]
            raise ConstraintConfigError(f"{where}: could not load reward model '{self.model_name_or_path}': {message}") from err
        self._resolve_format(path)
        self._resolve_held_out(path)
        tokenizer.truncation_side = self.truncation_side
        if not ensure_pad_token(tokenizer):
            raise ConstraintError(f"{where}: the reward model's tokenizer has neither a pad nor an eos token")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.eval().requires_grad_(False)
        self.tokenizer, self.model = tokenizer, model.to(self.device)

    def _resolve_format(self, path: str) -> None:
        """Fill the formatting options left at None from the RM folder's FORMAT_FILE, else the defaults."""
        saved: dict[str, Any] = {}
        spec_file = Path(path) / FORMAT_FILE
        if spec_file.is_file():
            saved = json.loads(spec_file.read_text()).get("format", {})
        for key, default in FORMAT_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, saved.get(key, default))
        if saved:
            log.info("constraint '%s': text format from %s: %s", self.name, spec_file, {k: getattr(self, k) for k in FORMAT_DEFAULTS})

    def _resolve_held_out(self, path: str) -> None:
        """``calibration: held_out`` for an RM that was not a local folder at construction (a hub name, ``pkg:``).

        A calibration already known (a local folder, or a resumed run's ``load_state_dict``) is kept.
        """
        if self.calibration_source != HELD_OUT or self.calibration is not None:
            return
        folder = Path(path).expanduser()
        spec_file = folder / FORMAT_FILE if folder.is_dir() else _hub_file(path, FORMAT_FILE)
        self.calibration = read_held_out_calibration(spec_file, f"constraint '{self.name}'", ConstraintConfigError)
        log.info("constraint '%s': held-out calibration from %s: mean %.4f, std %.4f",
                 self.name, self.calibration["source"], self.calibration["mean"], self.calibration["std"])

    def setup(self, device: torch.device | str) -> None:
        """Load the RM onto ``device``; compute the calibration from ``calibration_file`` if not known yet.

        Idempotent and cheap after the first call. Scoring before ``setup`` loads the RM on the CPU
        (and calibrates) on first use, so scores are standardised whichever hooks ran.
        """
        self.device = torch.device(device)
        self.load()
        self.model.to(self.device)
        self._ensure_calibrated()

    def _ensure_calibrated(self) -> None:
        if self.calibration is None and self.calibration_file is not None:
            self.calibration = self.calibrate(self.calibration_file, self.calibration_max_rows)

    def calibrate(self, path: str | Path, max_rows: int | None = None) -> dict[str, Any]:
        """Mean and std of the raw scores of a file's ``{prompt, response}`` rows."""
        where = f"constraint '{self.name}': calibration_file '{path}'"
        rows = load_rows(path)[:max_rows]
        if len(rows) < 2:
            raise ConstraintConfigError(f"{where}: needs at least 2 rows, has {len(rows)}")
        prompts, responses = [], []
        for i, row in enumerate(rows):
            for field in ("prompt", "response"):
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    got = row.get(field) if isinstance(row, dict) else row
                    raise ConstraintConfigError(f"{where}: row {i}: field '{field}' must be a string, got {got!r:.80}")
            prompts.append(row["prompt"])
            responses.append(row["response"])
        raw = self.raw_scores(prompts, responses)
        mean, std = float(raw.mean()), float(raw.std(unbiased=False))
        if not math.isfinite(std) or std < 1e-8:
            raise ConstraintConfigError(f"{where}: the raw scores have std {std:g}; cannot standardise")
        log.info("constraint '%s': calibrated on %d rows of %s: mean %.4f, std %.4f", self.name, len(rows), path, mean, std)
        return {"mean": mean, "std": std, "rows": len(rows), "source": str(path)}

    # --- scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Un-standardised RM outputs (float64, CPU), ``batch_size`` texts per forward pass."""
        self.load()
        out = []
        limit = self.max_length
        model_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(model_limit, int) and 0 < model_limit < limit:
            limit = model_limit
        for start in range(0, len(responses), self.batch_size):
            formatted = [
                format_for_reward_model(self.tokenizer, p, r, self.input_format, self.template)
                for p, r in zip(prompts[start : start + self.batch_size], responses[start : start + self.batch_size])
            ]
            texts = [f[0] for f in formatted]
            pairs = [f[1] for f in formatted] if formatted[0][1] is not None else None
            encoded = self.tokenizer(
                texts,
                text_pair=pairs,
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
                add_special_tokens=formatted[0][2],
            ).to(self.device)
            logits = self.model(**encoded).logits
            if logits.dim() != 2 or self.output_index >= logits.shape[-1]:
                raise ConstraintError(
                    f"constraint '{self.name}': output_index {self.output_index} is out of range for reward-model logits of shape {tuple(logits.shape)}"
                )
            out.append(logits[:, self.output_index].double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        if self.calibration is None:
            return raw
        return (raw - self.calibration["mean"]) / self.calibration["std"]

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **columns: Any
    ) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ConstraintError(f"constraint '{self.name}': got {len(prompts)} prompts for {len(completions)} completions")
        self.load()
        self._ensure_calibrated()
        return self.standardise(self.raw_scores(list(prompts), list(completions)))

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {} if self.calibration is None else {"calibration": dict(self.calibration)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("calibration") is not None:
            self.calibration = self._check_calibration(state["calibration"])

    def _check_calibration(self, calibration: Any) -> dict[str, Any]:
        where = f"constraint '{self.name}': calibration"
        if not isinstance(calibration, dict) or not {"mean", "std"} <= set(calibration):
            raise ValueError(f"{where} must be a mapping with 'mean' and 'std', got {calibration!r:.120}")
        mean, std = calibration["mean"], calibration["std"]
        if not _is_finite_number(mean):
            raise ValueError(f"{where}.mean must be a finite number, got {mean!r}")
        if not _is_finite_number(std) or std <= 0:
            raise ValueError(f"{where}.std must be a finite number > 0, got {std!r}")
        return {**calibration, "mean": float(mean), "std": float(std)}

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, model={self.model_name_or_path})"


class HelpfulnessConstraint(RewardModelConstraint):
    """Helpfulness preset: ``Ray2333/gpt2-large-helpful-reward_model`` by default.

    A GPT-2 large ``GPT2ForSequenceClassification`` (one logit) trained on the *helpful* subset of
    Anthropic/hh-rlhf; its model card reports 0.726 pairwise accuracy on that subset's test split
    and asks for the HH formulation, which is this class's default template. About 3 GB in fp32:
    ``dtype: bfloat16`` on a GPU. Override ``model_name_or_path`` with any other RM (hub name or path),
    e.g. one you trained with ``RewardModelModule``. Default scale 1.0 (raw logits are O(1); set a
    ``calibration``/``calibration_file`` to put the threshold in standard deviations).
    """

    registry_name = "helpfulness"
    default_model = "Ray2333/gpt2-large-helpful-reward_model"
    default_scale = 1.0


class HarmlessnessConstraint(RewardModelConstraint):
    """Harmlessness preset: ``Ray2333/gpt2-large-harmless-reward_model`` by default.

    A GPT-2 large ``GPT2ForSequenceClassification`` (one logit) trained on the *harmless* subset of
    Anthropic/hh-rlhf (the subset ``hh-rlhf-harmless-base`` comes from); its model card reports 0.737
    pairwise accuracy on that subset's test split and asks for the HH formulation, this class's
    default template. About 3 GB in fp32: ``dtype: bfloat16`` on a GPU. Offline, point
    ``model_name_or_path`` at an RM trained with ``configs/rm-harmless.yaml``. Default scale 1.0.
    """

    registry_name = "harmlessness"
    default_model = "Ray2333/gpt2-large-harmless-reward_model"
    default_scale = 1.0
