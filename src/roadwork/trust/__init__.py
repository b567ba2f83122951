"""The trust layer: numpy only (no torch, no web framework). Fitted objects round-trip through JSON."""

from roadwork.trust._checks import softmax
from roadwork.trust.calibration import IdentityCalibrator, TemperatureScaler, make_calibrator
from roadwork.trust.conformal import SplitConformal, conformal_quantile
from roadwork.trust.policy import PolicyOutput, TrustPolicy
from roadwork.trust.predictions import Predictions
from roadwork.trust.risk import FalseNegativeControl
from roadwork.trust.selective import AbstentionCertificate, certify_abstention

__all__ = [
    "AbstentionCertificate",
    "FalseNegativeControl",
    "IdentityCalibrator",
    "PolicyOutput",
    "Predictions",
    "SplitConformal",
    "TemperatureScaler",
    "TrustPolicy",
    "certify_abstention",
    "conformal_quantile",
    "make_calibrator",
    "softmax",
]
