"""Prometheus exposition of the server's state, read at scrape time.

One ``CollectorRegistry`` per server (tests run several servers in one process). Nothing is
incremented through prometheus-client on the hot path: the collector turns the plain
``Counters``, the endpoint's ``EndpointStats``, the transaction layer's stats and the
registry's O(1) counts into metric families when ``/metrics`` is fetched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from registry.devices import DeviceRegistry

from .sip.endpoint import SipEndpoint
from .stats import Counters

__all__ = ["ServerCollector", "make_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerCollector(Collector):
    def __init__(self, *, counters: Counters, endpoint: SipEndpoint, registry: DeviceRegistry,
                 extra: Callable[[], Iterator] | None = None) -> None:
        self.counters = counters
        self.endpoint = endpoint
        self.registry = registry
        self.extra = extra

    def collect(self) -> Iterator:
        c = self.counters
        total, online = self.registry.counts()
        registered = GaugeMetricFamily("gb28181_devices_registered", "Devices known to the registry")
        registered.add_metric([], total)
        yield registered
        on = GaugeMetricFamily("gb28181_devices_online", "Devices currently online")
        on.add_metric([], online)
        yield on

        reg = CounterMetricFamily("gb28181_register_requests", "REGISTER requests by outcome",
                                  labels=["result"])
        reg.add_metric(["ok"], c.register_ok)
        reg.add_metric(["challenged"], c.register_challenged)
        reg.add_metric(["unregistered"], c.unregistered)
        for reason, n in c.register_failures.items():
            reg.add_metric([f"rejected:{reason}"], n)
        yield reg

        auth = CounterMetricFamily("gb28181_auth_failures", "Failed digest checks by reason",
                                   labels=["reason"])
        for reason, n in c.auth_failures.items():
            auth.add_metric([reason], n)
        yield auth
        lock = CounterMetricFamily("gb28181_auth_lockouts", "Device/source pairs locked out")
        lock.add_metric([], c.lockouts)
        yield lock

        ka = CounterMetricFamily("gb28181_keepalives", "Keepalive MESSAGEs by outcome",
                                 labels=["result"])
        ka.add_metric(["ok"], c.keepalives)
        for reason, n in c.keepalives_rejected.items():
            ka.add_metric([f"rejected:{reason}"], n)
        yield ka

        msgs = CounterMetricFamily("gb28181_messages", "MANSCDP MESSAGEs received by CmdType",
                                   labels=["cmd_type"])
        for cmd, n in c.messages.items():
            msgs.add_metric([cmd], n)
        yield msgs
        rej = CounterMetricFamily("gb28181_messages_rejected", "MESSAGEs refused, by reason",
                                  labels=["reason"])
        for reason, n in c.messages_rejected.items():
            rej.add_metric([reason], n)
        yield rej

        q = CounterMetricFamily("gb28181_queries", "MANSCDP queries to devices", labels=["result"])
        q.add_metric(["sent"], c.queries_sent)
        q.add_metric(["answered"], c.queries_answered)
        q.add_metric(["timed_out"], c.queries_timed_out)
        yield q
        faults = CounterMetricFamily("gb28181_device_faults", "Keepalives reporting a new fault")
        faults.add_metric([], c.faults_reported)
        yield faults
        shed = CounterMetricFamily("gb28181_sip_overload_rejected",
                                   "Requests answered 503 because the server was overloaded")
        shed.add_metric([], c.overload_rejected)
        yield shed

        st = self.endpoint.stats
        sip = CounterMetricFamily("gb28181_sip_messages", "SIP messages on the wire",
                                  labels=["direction"])
        sip.add_metric(["in"], st.received)
        sip.add_metric(["out"], st.sent)
        yield sip
        perr = CounterMetricFamily("gb28181_sip_parse_errors", "Unparsable SIP messages received")
        perr.add_metric([], st.parse_errors)
        yield perr

        ls = self.endpoint.layer.stats
        tx = CounterMetricFamily("gb28181_sip_transactions", "SIP transactions started",
                                 labels=["role"])
        tx.add_metric(["client"], ls["client_started"])
        tx.add_metric(["server"], ls["server_started"])
        yield tx
        for key, help_text in (("retransmissions", "SIP retransmissions sent"),
                               ("absorbed", "Retransmitted requests/responses absorbed"),
                               ("timeouts", "SIP transactions timed out")):
            m = CounterMetricFamily(f"gb28181_sip_{key}", help_text)
            m.add_metric([], ls[key])
            yield m
        live = GaugeMetricFamily("gb28181_sip_transactions_live", "Transactions in memory",
                                 labels=["role"])
        live.add_metric(["client"], len(self.endpoint.layer.client))
        live.add_metric(["server"], len(self.endpoint.layer.server))
        yield live
        tcp = GaugeMetricFamily("gb28181_sip_tcp_connections", "Open SIP TCP connections")
        tcp.add_metric([], len(self.endpoint._tcp_conns))
        yield tcp
        if self.extra is not None:
            yield from self.extra()


def make_registry(collector: ServerCollector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
