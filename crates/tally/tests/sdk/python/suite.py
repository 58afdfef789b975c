"""OpenMeter's official Python SDK (PyPI `openmeter`, unmodified) against a
running `tally serve`: every call of the events, meters and subjects
families, and the CloudEvents SDK's binary and structured HTTP modes
(crates/tally/tests/sdk.rs).

usage: python suite.py BASE_URL TOKEN
Prints one line per check and exits 1 on the first failure.
"""

import datetime as dt
import json
import sys
import time
import traceback
import urllib.request

from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from openmeter import Client
from openmeter.models import Event, MeterCreate, MeterQueryRequest, MeterUpdate

BASE, TOKEN = sys.argv[1], sys.argv[2]
om = Client(endpoint=BASE, token=TOKEN)

NOW = dt.datetime.now(dt.timezone.utc)
MINUTE = dt.timedelta(minutes=1)
# Events a few minutes ago, at odd microseconds.
T0 = NOW.replace(second=0, microsecond=0) - 10 * MINUTE + dt.timedelta(microseconds=1234)


def at(seconds):
    return T0 + dt.timedelta(seconds=seconds)


def check(name, f):
    try:
        f()
        print(f"ok {name}")
    except Exception:  # noqa: BLE001 - report any failure and stop
        print(f"FAILED {name}: {traceback.format_exc()}")
        sys.exit(1)


def refused(f, status):
    try:
        f()
    except HttpResponseError as e:
        assert e.status_code == status, f"expected {status}, got {e.status_code}: {e}"
        return e
    raise AssertionError(f"expected HTTP {status}")


def ready(f):
    for _ in range(200):
        try:
            return f()
        except HttpResponseError as e:
            if e.status_code != 503:
                raise
            time.sleep(0.05)
    return f()


def raw(method, path, body=None, headers=None):
    request = urllib.request.Request(
        BASE + path, data=body, method=method,
        headers={"authorization": f"Bearer {TOKEN}", **(headers or {})})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def create_meter():
    m = om.meters.create(MeterCreate(
        slug="py_tokens", name="Python tokens", description="tokens by model",
        aggregation="SUM", event_type="py.prompt", value_property="$.tokens",
        group_by={"model": "$.model"}))
    assert m.slug == "py_tokens" and m.name == "Python tokens", m
    assert m.description == "tokens by model"
    assert m.id and m.created_at and m.updated_at


def ingest():
    def event(i, subject, seconds, tokens, model):
        return Event(id=f"py-{i}", source="py-suite", type="py.prompt", subject=subject,
                     specversion="1.0", time=at(seconds), data={"tokens": tokens, "model": model})
    assert om.events.ingest_event(event(1, "customer-1", 0, 10, "small")) is None
    assert om.events.ingest_events([
        event(2, "customer-1", 30, 5, "large"),
        event(3, "customer-2", 120.5, 7, "small"),
    ]) is None
    assert om.events.ingest_events_json(event(4, "customer-2", 121, 1, "small")) is None
    refused(lambda: om.events.ingest_event(
        Event(id="bad", source="s", type="py.prompt", subject="", specversion="1.0")), 400)


def cloudevents_sdk():
    # The CloudEvents SDK's binary mode: attributes in ce-* headers, the
    # data in the body, Content-Type its type. (This SDK does not
    # percent-encode header values; sdk.rs sends encoded ones by hand.)
    attributes = {"id": "ce-bin", "source": "py-suite/ce", "type": "py.prompt",
                  "subject": "customer-3", "time": at(1.5).isoformat(), "region": "eu",
                  "datacontenttype": "application/json"}
    headers, body = to_binary(CloudEvent(attributes, {"tokens": 2, "model": "large"}))
    status, _ = raw("POST", "/api/v1/events", body, headers)
    assert status == 204, status
    # ... and its structured mode.
    attributes = dict(attributes, id="ce-struct")
    del attributes["datacontenttype"]
    headers, body = to_structured(CloudEvent(attributes, {"tokens": 3, "model": "large"}))
    status, _ = raw("POST", "/api/v1/events", body, headers)
    assert status == 204, status
    listed = om.events.list(id="ce-bin")
    assert len(listed) == 1, listed
    stored = listed[0].event
    assert stored.subject == "customer-3", stored
    assert stored.datacontenttype == "application/json", stored
    assert stored.data == {"tokens": 2, "model": "large"}, stored
    assert stored["region"] == "eu", stored


def list_events():
    all1 = om.events.list(subject="customer-1")
    assert [e.event.id for e in all1] == ["py-2", "py-1"], all1
    assert all(e.ingested_at and e.stored_at for e in all1)
    stored = all1[0].ingested_at
    assert om.events.list(ingested_at_to=stored - dt.timedelta(hours=1)) == []
    some = om.events.list(ingested_at_from=stored - dt.timedelta(hours=1),
                          ingested_at_to=NOW + dt.timedelta(hours=1))
    assert len(some) == 6, some
    window = om.events.list(from_parameter=at(0), to=at(0.001))
    assert [e.event.id for e in window] == ["py-1"], window
    refused(lambda: om.events.list(from_parameter=at(1), to=at(0)), 400)
    refused(lambda: om.events.list(customer_id=["c"]), 400)


def list_events_v2():
    pages = list(om.events_v2.list(limit=2))
    assert len(pages) == 6, pages  # ItemPaged follows nextCursor
    only = list(om.events_v2.list(filter={"subject": {"eq": "customer-2"}}))
    assert sorted(e.event.id for e in only) == ["py-3", "py-4"], only
    late = list(om.events_v2.list(filter={"time": {"gte": at(120).isoformat()}}))
    assert sorted(e.event.id for e in late) == ["py-3", "py-4"], late
    refused(lambda: list(om.events_v2.list(filter={"subject": {"in": ["a"]}})), 400)


def meters_get_update():
    meters = om.meters.list()
    m = next(m for m in meters if m.slug == "py_tokens")
    assert om.meters.get(m.id).slug == "py_tokens"
    assert om.meters.get("py_tokens").id == m.id
    assert [x.slug for x in om.meters.list(order_by="key", order="DESC", page=1, page_size=1)] == ["py_tokens"]
    refused(lambda: om.meters.list(include_deleted=True), 400)
    try:
        om.meters.get("no-such-meter")
        raise AssertionError("expected 404")
    except ResourceNotFoundError:
        pass
    time.sleep(0.01)
    updated = om.meters.update(m.id, MeterUpdate(
        name="Python tokens (renamed)", description="tokens by model and tier",
        group_by={"model": "$.model", "tier": "$.tier"}))
    assert updated.name == "Python tokens (renamed)", updated
    assert updated.description == "tokens by model and tier"
    assert updated.created_at == m.created_at
    assert updated.updated_at > m.updated_at


def queries():
    to = NOW + MINUTE
    total = ready(lambda: om.meters.query_json("py_tokens", from_parameter=T0, to=to))
    assert [r.value for r in total.data] == [28], total  # 10+5+7+1+2+3
    # Bounds of any precision are answered exactly: py-1 (at T0) is out.
    part = om.meters.query_json("py_tokens", from_parameter=at(0.001), to=at(120.5))
    assert [r.value for r in part.data] == [10], part  # py-2, ce-bin, ce-struct
    by_subject = om.meters.query_json("py_tokens", from_parameter=T0, to=to, group_by=["subject"],
                                      subject=["customer-1", "customer-2"], window_size="MINUTE",
                                      window_time_zone="America/St_Johns")
    sums = {}
    for r in by_subject.data:
        sums[r.subject] = sums.get(r.subject, 0) + r.value
    assert sums == {"customer-1": 15, "customer-2": 8}, sums
    small = om.meters.query_json("py_tokens", from_parameter=T0, to=to, filter_group_by={"model": "small"})
    assert [r.value for r in small.data] == [18], small
    refused(lambda: om.meters.query_json("py_tokens", filter_customer_id=["c"]), 400)
    posted = om.meters.query("py_tokens", MeterQueryRequest(
        from_property=T0, to=to, group_by=["model"], filter_group_by={"model": ["large"]}))
    assert [(r.group_by["model"], r.value) for r in posted.data] == [("large", 10)], posted
    values = om.meters.list_group_by_values("py_tokens", "model", from_parameter=T0)
    assert values == ["large", "small"], values
    subjects = om.meters.list_subjects("py_tokens", from_parameter=T0)
    assert subjects == ["customer-1", "customer-2", "customer-3"], subjects


def subjects():
    listed = om.subjects.list()
    assert [s.key for s in listed] == ["customer-1", "customer-2", "customer-3"], listed
    assert om.subjects.get("customer-1").key == "customer-1"
    try:
        om.subjects.get("nobody")
        raise AssertionError("expected 404")
    except ResourceNotFoundError:
        pass
    refused(lambda: om.subjects.upsert([{"key": "x"}]), 501)
    refused(lambda: om.subjects.delete("customer-1"), 501)


def not_served():
    # Some listings are lazy pages: list() makes them ask.
    for family in [om.entitlements_v2, om.features, om.plans, om.customers, om.invoices, om.apps]:
        e = refused(lambda: list(family.list()), 501)
        assert "Tally does not serve" in str(e.response.text()), e.response.text()


def delete_meter():
    om.meters.create(MeterCreate(slug="py_scratch", aggregation="COUNT", event_type="py.scratch"))
    assert om.meters.delete("py_scratch") is None
    try:
        om.meters.get("py_scratch")
        raise AssertionError("expected 404")
    except ResourceNotFoundError:
        pass


check("meters.create", create_meter)
check("events.ingest_event, ingest_events, ingest_events_json (204)", ingest)
check("CloudEvents SDK: binary and structured mode", cloudevents_sdk)
check("events.list (ingestedAt/storedAt, filters)", list_events)
check("events_v2.list (cursor pages, JSON filter)", list_events_v2)
check("meters.list/get by id and slug/update", meters_get_update)
check("meters.query_json, query (POST), group-by values, meter subjects", queries)
check("subjects.list/get; upsert/delete 501", subjects)
check("features beyond metering: 501", not_served)
check("meters.delete", delete_meter)
