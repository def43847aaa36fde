"""``TokenRewardSource``: the one interface for "dense token rewards of these token ids".

``Scorer.token_rewards`` and ``ImplicitPRM.token_rewards`` both satisfy it; the RL adapters
(``freeprm.integrations``) accept anything that does.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenRewardSource(Protocol):
    """Anything with ``token_rewards(input_ids, attention_mask, response_mask) -> Tensor [B, T]``.

    Inputs are ``[B, T]`` (token ids, 0/1 attention mask, bool response mask; any padding side;
    ``response_mask[:, 0]`` False). The result is fp32 ``[B, T]``::

        rewards = beta * (log pi(x_t | x_<t) - log pi_ref(x_t | x_<t)) * response_mask

    (``log pi_ref = 0`` without a reference), 0 off the response mask; a row's rewards do not depend
    on the other rows of the batch.
    """

    def token_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> torch.Tensor: ...
