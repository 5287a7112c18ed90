"""Gated delta rule: chunked/recurrent jnp references and Pallas kernels."""

from pallas_kernels.gated_delta_rule.api import available_implementations
from pallas_kernels.gated_delta_rule.api import gated_delta_rule

__all__ = ["available_implementations", "gated_delta_rule"]
