"""Cascade (GB/T 28181-2016 §9, Annex J): this instance as a lower platform to upper platforms."""
