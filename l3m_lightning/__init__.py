"""l3m-lightning: constrained fine-tuning of causal LMs with the L3M relaxed log-barrier."""

from l3m_lightning.barrier import MuSchedule, relaxed_log_barrier, relaxed_log_barrier_grad
from l3m_lightning.estimator import constraint_multipliers, leave_one_out_baseline, policy_gradient_surrogate

__all__ = [
    "MuSchedule",
    "constraint_multipliers",
    "leave_one_out_baseline",
    "policy_gradient_surrogate",
    "relaxed_log_barrier",
    "relaxed_log_barrier_grad",
]
