"""Measurements shared by every algorithm: accuracy summaries, bytes on the wire, training FLOPs."""

from pfedlora.metrics.accuracy import AccuracyReport, CurveSummary, summarize_curve
from pfedlora.metrics.communication import Channel, payload_bytes
from pfedlora.metrics.flops import FlopMeter

__all__ = ["AccuracyReport", "Channel", "CurveSummary", "FlopMeter", "payload_bytes", "summarize_curve"]
