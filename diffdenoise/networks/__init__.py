"""Networks: the exactly blind BSN (stage 1)."""

from .bsn import BlindSpotNet
