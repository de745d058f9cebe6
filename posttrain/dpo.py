"""Direct Preference Optimization (DPO): fit a policy to pairs of completions (chosen preferred to
rejected) without a reward model or sampling, by a logistic loss on the difference of the two
completions' log-likelihood ratios to a frozen reference model (Rafailov et al. 2023, "Direct
Preference Optimization: Your Language Model is Secretly a Reward Model", eq. 7).

Variants, selected by loss_type, as TRL's DPOTrainer (trl 1.16, trl/trainer/dpo_trainer.py) names them:
- sigmoid: the DPO loss itself, -log sigmoid(beta * margin) (Rafailov et al. eq. 7);
- hinge: the SLiC hinge, relu(1 - beta * margin) (Zhao et al. 2023, eq. 10);
- ipo: IPO's squared loss (Azar et al. 2023, eq. 17) on per-token (length-normalised) log-ratios;
- robust: the unbiased loss under label noise of rate label_smoothing (Chowdhury et al. 2024, eq. 9).

The loss is checked against TRL's DPOTrainer on identical tensors in tests/test_posttrain_losses.py.
"""

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Loss

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean preference loss over a batch of B pairs.

    Every *_logps is (B,): a completion's log-probability summed over its tokens, under the policy or
    the reference. chosen_lengths / rejected_lengths (B,) count completion tokens; only 'ipo' reads
    them (required there). label_smoothing is the assumed probability that a label is flipped; only
    'robust' reads it, as in TRL 1.16, so any other loss type refuses a non-zero value.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} is not one of {DPO_LOSS_TYPES}")
    if label_smoothing != 0.0 and loss_type != "robust":
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} applies to loss_type='robust' only")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    # The implicit rewards of eq. 5 (up to beta): log pi(y|x) - log pi_ref(y|x), (B,)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)  # eq. 7
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss: loss_type='ipo' needs chosen_lengths and rejected_lengths")
        # Summed log-ratios grow with length; IPO's authors (via TRL) divide by the token count so
        # that beta (tau in eq. 17) means the same at every length. An empty completion counts as 1.
        per_token_margin = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(
            min=1
        )
        losses = (per_token_margin - 1 / (2 * beta)) ** 2  # eq. 17, tau = beta
    else:  # robust: eq. 9, the loss whose expectation under flips of rate eps is the clean loss
        eps = label_smoothing
        losses = ((1 - eps) * -F.logsigmoid(beta * margin) - eps * -F.logsigmoid(-beta * margin)) / (1 - 2 * eps)
    return losses.mean()
