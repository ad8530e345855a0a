"""Measurements shared by every algorithm: accuracy summaries, bytes on the wire, training FLOPs."""

from pfedlora.metrics.accuracy import AccuracyReport, progress_to_target, summarize_curve
from pfedlora.metrics.communication import Channel, payload_bytes
from pfedlora.metrics.flops import FlopMeter

__all__ = ["AccuracyReport", "Channel", "FlopMeter", "payload_bytes", "progress_to_target", "summarize_curve"]
