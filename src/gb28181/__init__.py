"""gb28181: a GB/T 28181 video-surveillance platform core.

SIP signalling (registrar, MANSCDP, dialogs, cascade) lives in this package; media (RTP, PS,
relay, outputs) in ``media``; devices, channels and their storage in ``registry``.
"""

__version__ = "0.1.0"
