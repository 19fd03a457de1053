"""legcomp: thigh and calf muscle and fat composition from two-point Dixon MRI."""

__version__ = "0.1.0"
