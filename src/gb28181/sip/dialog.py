"""SIP dialogs (RFC 3261 §12) as plain state: no I/O, no timers.

A dialog is what INVITE sessions and subscriptions (RFC 6665) have in common: a Call-ID, our
tag and the peer's, the peer's address-of-record and its *remote target* (the Contact it gave,
where in-dialog requests are addressed), a *route set* (from Record-Route, which proxies and
some lower platforms insert), and the two CSeq counters. ``Dialog`` is built from the message
that creates it (``from_response`` on the side that sent the request, ``from_request`` on the
side that received it), builds the in-dialog requests (``request``, ``ack``) with the right
Request-URI and Route headers, checks and records the peer's requests (``receive_request``),
and follows target refreshes (a new Contact in a re-INVITE, a NOTIFY or a refreshed SUBSCRIBE).

Who uses it: ``gb28181.invite`` (live video INVITEs to devices), ``gb28181.subscriptions``
(catalog subscriptions to devices) and the device simulator, each keeping one ``Dialog`` per
session instead of copies of its fields. Where a request is *sent* (which address, which
connection) is the transport's decision; ``next_hop`` only says which URI RFC 3261 §8.1.2 and
§12.2.1.1 route it to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .message import (
    SipMessage,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    new_request,
    parse_name_addr,
    parse_uri,
)

__all__ = ["Dialog", "DialogError", "TARGET_REFRESH"]

#: Requests whose Contact replaces the remote target (RFC 3261 §12.2; RFC 6665 §4.1.2.2 for
#: NOTIFY and SUBSCRIBE; RFC 3311 UPDATE).
TARGET_REFRESH = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY"})


class DialogError(ValueError):
    """A message cannot create or belong to the dialog; the text says why."""


def _uri_of(value: str) -> str:
    return parse_name_addr(value).uri


@dataclass(slots=True)
class Dialog:
    """One dialog, seen from our side; see the module docstring."""

    call_id: str
    local_tag: str
    remote_tag: str
    #: Our address-of-record (the From of our requests) and the peer's (their To).
    local_uri: str
    remote_uri: str
    #: The peer's Contact URI: the Request-URI of our in-dialog requests.
    remote_target: str
    #: Route header values for our requests, in the order they are sent.
    route_set: list[str] = field(default_factory=list)
    #: The CSeq number of our last request in the dialog (ACK and CANCEL reuse theirs).
    local_cseq: int = 0
    #: The CSeq number of the peer's last in-dialog request; None until it sends one.
    remote_cseq: int | None = None
    #: "early" (a provisional response with a To tag), "confirmed", or "terminated".
    state: str = "confirmed"

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def from_response(cls, response: SipResponse, *, fallback_target: str = "") -> Dialog:
        """The dialog a response to our INVITE or SUBSCRIBE creates (RFC 3261 §12.1.2).

        Everything is read from the response, whose From, To, Call-ID and CSeq echo our
        request: so a 2xx that arrives after the request was given up on still yields a dialog
        that can be ACKed and ended. ``fallback_target`` is the remote target when the
        response has no Contact (some devices omit it): the Request-URI we used.
        """
        try:
            local = parse_name_addr(response.headers["from"][0])
            remote = parse_name_addr(response.headers["to"][0])
        except (KeyError, SipParseError) as exc:
            raise DialogError(f"response has no usable From/To: {exc}") from None
        if not local.tag:
            raise DialogError("response From has no tag")
        target = fallback_target or remote.uri
        contact = response.get("contact")
        if contact:
            try:
                target = _uri_of(contact)
            except SipParseError:
                pass  # a garbled Contact: keep the fallback rather than lose the dialog
        routes = list(reversed(response.get_all("record-route")))
        return cls(
            call_id=response.call_id, local_tag=local.tag, remote_tag=remote.tag or "",
            local_uri=local.uri, remote_uri=remote.uri, remote_target=target, route_set=routes,
            local_cseq=response.cseq[0],
            state="confirmed" if 200 <= response.status < 300 else "early")

    @classmethod
    def from_request(cls, request: SipRequest, local_tag: str) -> Dialog:
        """The dialog we create by answering ``request`` (INVITE or SUBSCRIBE) with a 2xx
        carrying To tag ``local_tag`` (RFC 3261 §12.1.1)."""
        try:
            remote = parse_name_addr(request.headers["from"][0])
            local = parse_name_addr(request.headers["to"][0])
        except (KeyError, SipParseError) as exc:
            raise DialogError(f"request has no usable From/To: {exc}") from None
        target = remote.uri
        contact = request.get("contact")
        if contact:
            try:
                target = _uri_of(contact)
            except SipParseError:
                pass
        return cls(
            call_id=request.call_id, local_tag=local_tag, remote_tag=remote.tag or "",
            local_uri=local.uri, remote_uri=remote.uri, remote_target=target,
            route_set=request.get_all("record-route"), local_cseq=0,
            remote_cseq=request.cseq[0])

    # -- identity -----------------------------------------------------------------------------
    @property
    def id(self) -> tuple[str, str, str]:
        """(Call-ID, local tag, remote tag): RFC 3261 §12's dialog ID."""
        return (self.call_id, self.local_tag, self.remote_tag)

    def matches(self, message: SipMessage, *, incoming: bool = True) -> bool:
        """Whether ``message`` belongs here: an incoming request carries our tag in To and
        theirs in From; a response to our request the other way round. An empty remote tag
        (we have not heard from the peer yet) matches any."""
        if message.call_id != self.call_id:
            return False
        ours, theirs = (message.to_tag, message.from_tag) if incoming else (message.from_tag, message.to_tag)
        return ours == self.local_tag and (not self.remote_tag or theirs == self.remote_tag)

    # -- requests we send ------------------------------------------------------------------
    def request(self, method: str, *, via: str, contact: str | None = None,
                headers: dict[str, str] | None = None, body: bytes = b"",
                content_type: str | None = None, user_agent: str | None = None) -> SipRequest:
        """A new in-dialog request (RFC 3261 §12.2.1.1); takes the next local CSeq."""
        if method in ("ACK", "CANCEL"):
            raise DialogError(f"{method} reuses the CSeq of the request it refers to; use ack()")
        self.local_cseq += 1
        return self._build(method, self.local_cseq, via=via, contact=contact, headers=headers,
                           body=body, content_type=content_type, user_agent=user_agent)

    def ack(self, cseq: int, *, via: str, user_agent: str | None = None) -> SipRequest:
        """The ACK for a 2xx to our INVITE numbered ``cseq`` (RFC 3261 §13.2.2.4)."""
        return self._build("ACK", cseq, via=via, user_agent=user_agent)

    def _build(self, method: str, cseq: int, *, via: str, contact: str | None = None,
               headers: dict[str, str] | None = None, body: bytes = b"",
               content_type: str | None = None, user_agent: str | None = None) -> SipRequest:
        uri, routes = self._request_uri_and_routes()
        req = new_request(method, uri, via=via, from_uri=self.local_uri, from_tag=self.local_tag,
                          to_uri=self.remote_uri, to_tag=self.remote_tag or None,
                          call_id=self.call_id, cseq=cseq, contact=contact, headers=headers,
                          body=body, content_type=content_type, user_agent=user_agent)
        if routes:
            req.headers["route"] = routes
        return req

    def _request_uri_and_routes(self) -> tuple[str, list[str]]:
        if not self.route_set:
            return self.remote_target, []
        first = self._route_uri(0)
        if first is not None and "lr" in first.params:
            return self.remote_target, list(self.route_set)
        # A strict router (RFC 2543 style): it gets the Request-URI, the target goes last.
        strict = str(first) if first is not None else self.remote_target
        return strict, [*self.route_set[1:], f"<{self.remote_target}>"]

    def _route_uri(self, index: int) -> SipUri | None:
        try:
            return parse_uri(_uri_of(self.route_set[index]))
        except SipParseError:
            return None

    def next_hop(self) -> SipUri | None:
        """The URI whose host and port our in-dialog requests travel to: the first route when
        there is a route set, else the remote target (RFC 3261 §8.1.2). None if unparsable."""
        if self.route_set:
            return self._route_uri(0)
        try:
            return parse_uri(self.remote_target)
        except SipParseError:
            return None

    # -- what the peer sends ----------------------------------------------------------------
    def receive_request(self, request: SipRequest) -> int | None:
        """Record an in-dialog request from the peer (RFC 3261 §12.2.2).

        Returns None when it is acceptable, or the status to refuse it with: 500 for a CSeq
        lower than one already seen (an old or reordered request). A target-refresh request
        with a Contact moves the remote target. A request that reveals the peer's tag (a
        NOTIFY overtaking the 200 of our SUBSCRIBE) completes the dialog ID.
        """
        number = request.cseq[0]
        if request.method != "ACK":
            if self.remote_cseq is not None and number < self.remote_cseq:
                return 500
            self.remote_cseq = number
        if not self.remote_tag and request.from_tag:
            self.remote_tag = request.from_tag
        if request.method in TARGET_REFRESH:
            self._refresh_target(request)
        return None

    def receive_response(self, response: SipResponse) -> None:
        """A response to one of our in-dialog requests: a 2xx to a target-refresh request
        (re-INVITE, SUBSCRIBE refresh) may move the remote target."""
        if not self.remote_tag and response.to_tag:
            self.remote_tag = response.to_tag
        if 200 <= response.status < 300:
            if self.state == "early":
                self.state = "confirmed"
            if response.cseq[1] in TARGET_REFRESH:
                self._refresh_target(response)

    def _refresh_target(self, message: SipMessage) -> None:
        contact = message.get("contact")
        if contact:
            try:
                self.remote_target = _uri_of(contact)
            except SipParseError:
                pass
