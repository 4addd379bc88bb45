"""Parsing Kubernetes objects: what is accepted, and how a malformed object is reported."""

from __future__ import annotations

import pytest
from unit_objects import slice_raw, svc_raw

from kproxy.model import ModelError, parse_endpoint_slice, parse_service


def problem(raw, parse=parse_service, origin="dir/web.yaml") -> str:
    with pytest.raises(ModelError) as ei:
        parse(raw, origin)
    return str(ei.value)


def test_unknown_fields_ignored_and_defaults():
    raw = svc_raw(ports=[{"port": 80}])
    raw["spec"]["somethingNew"] = {"x": 1}
    raw["metadata"]["uid"] = "u"
    s = parse_service(raw)
    p = s.spec.ports[0]
    assert (p.name, p.protocol, p.target_port, p.node_port) == ("", "TCP", None, None)
    assert s.key == "default/web"
    assert s.spec.external_traffic_policy == "Cluster" and s.spec.session_affinity == "None"


def test_numeric_string_target_port_is_a_number():
    s = parse_service(svc_raw(ports=[{"port": 80, "targetPort": "8080"}]))
    assert s.spec.ports[0].target_port == 8080


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda r: r["spec"]["ports"][0].update(port=70000), "spec.ports[0].port"),
        (lambda r: r["spec"]["ports"][0].update(port=0), "spec.ports[0].port"),
        (lambda r: r["spec"]["ports"][0].update(port="eighty"), "spec.ports[0].port"),
        (lambda r: r["spec"]["ports"][0].update(protocol="ICMP"), "spec.ports[0].protocol"),
        (lambda r: r["spec"].update(clusterIP="10.96.0.300"), "'10.96.0.300' is not an IP address"),
        (lambda r: r["spec"].update(externalIPs=["nope"]), "externalIPs entry 'nope'"),
        (lambda r: r["spec"].update(type="Weird"), "spec.type"),
        (
            lambda r: r["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
            "duplicate port 80",
        ),
        (
            lambda r: r["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
            "duplicate port name",
        ),
        (lambda r: r["spec"].update(ports=[{"port": 80}, {"port": 81}]), "needs a name"),
        (
            lambda r: r["spec"].update(ports=[{"name": f"p{i}", "port": i + 1} for i in range(1000)]),
            "1000 ports",
        ),
        (
            lambda r: r["spec"].update(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
            "timeoutSeconds",
        ),
        (lambda r: r["metadata"].pop("name"), "metadata.name: Field required"),
        (lambda r: r.update(spec="x"), "spec"),
    ],
)
def test_malformed_service_names_object_origin_and_field(mutate, expect):
    raw = svc_raw()
    mutate(raw)
    msg = problem(raw)
    assert expect in msg
    assert "dir/web.yaml" in msg
    if "name" in raw["metadata"]:
        assert msg.startswith("Service default/web in dir/web.yaml skipped: ")


def test_malformed_error_attributes():
    with pytest.raises(ModelError) as ei:
        parse_service(svc_raw(name="api", namespace="prod", ports=[{"port": 0}]), "x.yaml")
    e = ei.value
    assert (e.kind, e.namespace, e.name, e.origin, e.reason) == (
        "Service",
        "prod",
        "api",
        "x.yaml",
        "invalid",
    )
    assert len(e.problems) == 1


def test_not_a_mapping():
    assert "expected a mapping" in problem(["a"])


def test_slice_bad_address_and_port():
    raw = slice_raw(endpoints=[{"addresses": ["10.0.0.999"]}])
    assert "is not an IPv4 address" in problem(raw, parse_endpoint_slice)
    raw = slice_raw(ports=[{"name": "http", "port": 0}])
    assert "ports[0].port" in problem(raw, parse_endpoint_slice)
    raw = slice_raw()
    del raw["addressType"]
    assert "EndpointSlice default/web-abc" in problem(raw, parse_endpoint_slice)


def test_slice_service_key_and_null_lists():
    raw = slice_raw()
    raw["endpoints"] = None
    s = parse_endpoint_slice(raw)
    assert s.service_key == "default/web" and s.endpoints == []
