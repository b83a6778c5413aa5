"""MANSRTSP: the RTSP-like bodies of playback-control INFO requests (GB/T 28181-2016 Annex B).

A platform controls a playback or download dialog with in-dialog INFO requests whose body
(``Content-Type: Application/MANSRTSP``) is an RTSP request line and headers (B.2):

- pause: ``PAUSE RTSP/1.0`` with ``PauseTime: now``;
- resume: ``PLAY RTSP/1.0`` with ``Range: npt=now-``;
- seek: ``PLAY RTSP/1.0`` with ``Range: npt=<seconds from the start of the range>-``;
- speed: ``PLAY RTSP/1.0`` with ``Scale: <x>`` (B.2.2: 0.25 to 8 here; negative is reverse);
- ``TEARDOWN RTSP/1.0``.

Its ``CSeq`` numbers the control requests of the dialog, apart from the SIP CSeq (B.2.1).
Devices write ``RTSP/1.0`` or ``MANSRTSP/1.0``; both are read. Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONTENT_TYPE", "MansrtspError", "Control", "build", "parse", "SCALE_MIN", "SCALE_MAX"]

CONTENT_TYPE = "Application/MANSRTSP"
SCALE_MIN, SCALE_MAX = 0.25, 8.0
_METHODS = ("PLAY", "PAUSE", "TEARDOWN")
_MAX_BODY = 2048


class MansrtspError(ValueError):
    """A MANSRTSP body that cannot be understood."""


@dataclass(slots=True, frozen=True)
class Control:
    """One control request. ``npt`` is the seek target in seconds (None: no Range, or
    ``npt=now-``: resume where paused); ``scale`` None when not given."""

    method: str
    cseq: int
    npt: float | None = None
    scale: float | None = None
    resume: bool = False  # Range: npt=now-

    @property
    def action(self) -> str:
        """pause | resume | seek | speed | teardown | play (a PLAY with nothing else)."""
        if self.method == "PAUSE":
            return "pause"
        if self.method == "TEARDOWN":
            return "teardown"
        if self.npt is not None:
            return "seek"
        if self.scale is not None:
            return "speed"
        return "resume" if self.resume else "play"


def build(control: Control) -> bytes:
    lines = [f"{control.method} RTSP/1.0", f"CSeq: {control.cseq}"]
    if control.method == "PAUSE":
        lines.append("PauseTime: now")
    elif control.method == "PLAY":
        if control.npt is not None:
            lines.append(f"Range: npt={control.npt:g}-")
        elif control.resume:
            lines.append("Range: npt=now-")
        if control.scale is not None:
            lines.append(f"Scale: {control.scale:g}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse(body: bytes) -> Control:
    """Read a MANSRTSP request body; MansrtspError says what is wrong."""
    if len(body) > _MAX_BODY:
        raise MansrtspError(f"MANSRTSP body of {len(body)} bytes is too long")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise MansrtspError("MANSRTSP body is not ASCII") from None
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n")]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise MansrtspError("empty MANSRTSP body")
    parts = lines[0].split()
    if len(parts) != 2 or parts[0].upper() not in _METHODS or not parts[1].upper().endswith("RTSP/1.0"):
        raise MansrtspError(f"not a MANSRTSP request line: {lines[0][:60]!r}")
    method = parts[0].upper()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise MansrtspError(f"not a header line: {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    cseq_text = headers.get("cseq", "")
    if not cseq_text.isdigit() or len(cseq_text) > 9:
        raise MansrtspError(f"CSeq must be a number, not {cseq_text[:20]!r}")
    npt: float | None = None
    resume = False
    rng = headers.get("range")
    if rng is not None:
        if not rng.lower().startswith("npt="):
            raise MansrtspError(f"only npt ranges are understood, not {rng[:40]!r}")
        first = rng[4:].split("-", 1)[0].strip()
        if first.lower() == "now":
            resume = True
        else:
            try:
                npt = float(first)
            except ValueError:
                raise MansrtspError(f"Range npt start {first[:20]!r} is not a number") from None
            if not 0 <= npt < 10 * 365 * 86400:
                raise MansrtspError(f"Range npt start {npt:g} is out of range")
    scale: float | None = None
    if "scale" in headers:
        try:
            scale = float(headers["scale"])
        except ValueError:
            raise MansrtspError(f"Scale {headers['scale'][:20]!r} is not a number") from None
        if not SCALE_MIN <= abs(scale) <= SCALE_MAX:
            raise MansrtspError(f"Scale {scale:g} is outside {SCALE_MIN:g}..{SCALE_MAX:g}")
    return Control(method, int(cseq_text), npt, scale, resume)
