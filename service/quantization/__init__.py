"""The INT8 mode's parts that need neither NNCF nor OpenVINO: which images calibrate a quantisation and which
check it (samples.py), and the guard that admits it against fp32 (guard.py). The quantisation itself is
service/worker/backends/openvino_quantize.py."""

from .guard import GuardResult, judge
from .samples import CalibrationError, CalibrationSet, calibration_set, load_samples

__all__ = ["CalibrationError", "CalibrationSet", "GuardResult", "calibration_set", "judge", "load_samples"]
