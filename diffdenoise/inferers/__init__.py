"""Inferers: one per stage, each usable as a bundle's `inferer`."""

from .blind_spot import BlindSpotInferer
from .srds import SRDSInferer
