"""Networks: the exactly blind BSN (stage 1) and the NAFNet student (stage 4)."""

from .bsn import BlindSpotNet
from .nafnet import NAFNet
