"""Inferers: one per stage, each usable as a bundle's `inferer`."""

from .blind_spot import BlindSpotInferer
from .posterior import PosteriorReinjection
from .prior import PriorInferer
from .srds import SRDSInferer
from .tweedie import AntitheticTweedieInferer, RecorruptedX0Inferer
