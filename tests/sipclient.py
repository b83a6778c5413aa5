"""A raw SIP peer for tests: crafts exact bytes, reads exact responses over a real UDP socket.

The simulator is a well-behaved device; this is for what a well-behaved device never sends
(wrong passwords, replays, garbage) and for checking the bytes the server answers with.
"""

from __future__ import annotations

import asyncio
import os

from gb28181.sip.auth import authorization_header
from gb28181.sip.message import SipRequest, SipResponse, make_response, parse_message


class _Proto(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data, addr) -> None:
        self.queue.put_nowait(data)


class RawSip:
    """One UDP socket acting as a device."""

    def __init__(self, server_port: int, device_id: str = "34020000001320000001",
                 server_id: str = "34020000002000000001", local_host: str = "127.0.0.1") -> None:
        self.server = ("127.0.0.1", server_port)
        self.device_id = device_id
        self.server_id = server_id
        self.local_host = local_host
        self.call_id = os.urandom(8).hex()
        self.tag = os.urandom(4).hex()
        self.cseq = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.proto = _Proto()
        self.port = 0
        self.requests: list = []

    async def __aenter__(self) -> RawSip:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self.proto, local_addr=(self.local_host, 0))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.transport is not None
        self.transport.close()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.server)

    async def recv(self, timeout: float = 2.0) -> SipResponse:
        """The next response; requests from the server (a DeviceInfo query) are set aside."""
        while True:
            data = await asyncio.wait_for(self.proto.queue.get(), timeout)
            msg = parse_message(data)
            if isinstance(msg, SipResponse):
                return msg
            self.requests.append(msg)

    async def request(self, method: str | None = None, timeout: float = 3.0) -> SipRequest:
        """The next request from the server (of ``method``, if given); responses are dropped."""
        for i, req in enumerate(self.requests):
            if method is None or req.method == method:
                return self.requests.pop(i)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            data = await asyncio.wait_for(self.proto.queue.get(), max(left, 0.001))
            msg = parse_message(data)
            if isinstance(msg, SipResponse):
                continue
            if method is None or msg.method == method:
                return msg
            self.requests.append(msg)

    def reply(self, req: SipRequest, status: int, reason: str = "", *, to_tag: str | None = None,
              body: bytes = b"", content_type: str | None = None,
              headers: dict[str, str] | None = None) -> SipResponse:
        """Answer ``req`` (to the server's SIP port)."""
        resp = make_response(req, status, reason, to_tag=to_tag, body=body, content_type=content_type)
        for name, value in (headers or {}).items():
            resp.set(name, value)
        self.send(resp.serialize())
        return resp

    async def no_more(self, wait: float = 0.3) -> list[SipResponse]:
        """Responses that arrive within ``wait`` seconds (requests are set aside)."""
        await asyncio.sleep(wait)
        out = []
        while not self.proto.queue.empty():
            msg = parse_message(self.proto.queue.get_nowait())
            if isinstance(msg, SipResponse):
                out.append(msg)
            else:
                self.requests.append(msg)
        return out

    def register_bytes(self, *, expires: int | str | None = 3600, authorization: str | None = None,
                       branch: str | None = None, device_id: str | None = None,
                       contact_params: str = "", contact_host: str | None = None) -> bytes:
        self.cseq += 1
        dev = device_id or self.device_id
        lines = [
            f"REGISTER sip:{self.server_id}@3402000000 SIP/2.0",
            f"Via: SIP/2.0/UDP {self.local_host}:{self.port};rport;branch={branch or 'z9hG4bK' + os.urandom(6).hex()}",
            f"From: <sip:{dev}@3402000000>;tag={self.tag}",
            f"To: <sip:{dev}@3402000000>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} REGISTER",
            f"Contact: <sip:{dev}@{contact_host or self.local_host}:{self.port}>{contact_params}",
            "Max-Forwards: 70",
        ]
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if authorization:
            lines.append(f"Authorization: {authorization}")
        lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def answer(self, challenge: SipResponse, password: str = "12345678",
               device_id: str | None = None, username: str | None = None) -> str:
        return authorization_header(challenge.get("www-authenticate") or "",
                                    username=username or device_id or self.device_id, password=password,
                                    method="REGISTER", uri=f"sip:{self.server_id}@3402000000")

    async def register(self, password: str = "12345678", expires: int = 3600,
                       username: str | None = None, contact_host: str | None = None) -> SipResponse:
        """The whole challenge flow; returns the final response. ``username``: a digest
        username other than the device ID; ``contact_host``: a Contact address other than the
        socket's (a device behind NAT)."""
        self.send(self.register_bytes(expires=expires, contact_host=contact_host))
        challenge = await self.recv()
        if challenge.status != 401:
            return challenge
        self.send(self.register_bytes(expires=expires, contact_host=contact_host,
                                      authorization=self.answer(challenge, password, username=username)))
        return await self.recv()

    def message_bytes(self, body: str, *, device_id: str | None = None,
                      content_type: str = "Application/MANSCDP+xml") -> bytes:
        dev = device_id or self.device_id
        raw = body.encode()
        lines = [
            f"MESSAGE sip:{self.server_id}@3402000000 SIP/2.0",
            f"Via: SIP/2.0/UDP {self.local_host}:{self.port};rport;branch=z9hG4bK{os.urandom(6).hex()}",
            f"From: <sip:{dev}@3402000000>;tag={os.urandom(4).hex()}",
            f"To: <sip:{self.server_id}@3402000000>",
            f"Call-ID: {os.urandom(8).hex()}",
            "CSeq: 20 MESSAGE",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(raw)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw

    def keepalive_bytes(self, device_id: str | None = None) -> bytes:
        dev = device_id or self.device_id
        return self.message_bytes(
            '<?xml version="1.0" encoding="GB2312"?>\r\n<Notify>\r\n<CmdType>Keepalive</CmdType>\r\n'
            f"<SN>1</SN>\r\n<DeviceID>{dev}</DeviceID>\r\n<Status>OK</Status>\r\n</Notify>\r\n",
            device_id=dev)
