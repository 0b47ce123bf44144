"""Online dynamic pruning (MC-MoE): dynamic skipping plus protection of important tokens."""

from moeslim.methods.odp.importance import protected_tokens, token_importance

__all__ = ["protected_tokens", "token_importance"]
