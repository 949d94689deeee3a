"""Property-based tests through the real Envoy: whatever JSON a REST client sends, the answer is
never a 5xx caused by the input, an invalid request stores nothing, and a valid one is stored
exactly once, however often it is sent."""

from __future__ import annotations

import json
import secrets
from typing import Any

import asyncpg
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..conftest import TokenFactory

REALTIME = "/v1/ingest/realtime"
UNITS = {
    "wellhead_pressure": (["psi", "bar", "kPa"], 0.0, 1000.0),
    "hookload": (["klbs"], 0.0, 1000.0),
    "flow_rate": (["bbl/day"], 0.0, 50000.0),
    "downhole_temperature": (["degF"], -50.0, 500.0),
}
PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def valid_point(draw: st.DrawFn, well: str) -> dict[str, Any]:
    parameter = draw(st.sampled_from(sorted(UNITS)))
    units, low, high = UNITS[parameter]
    return {
        "well_id": well,
        "timestamp": f"2025-{draw(st.integers(1, 12)):02d}-{draw(st.integers(1, 28)):02d}"
        f"T{draw(st.integers(0, 23)):02d}:{draw(st.integers(0, 59)):02d}:"
        f"{draw(st.integers(0, 59)):02d}.{draw(st.integers(0, 999_999)):06d}Z",
        "parameter_name": parameter,
        "value": draw(st.floats(low, high, allow_nan=False)),
        "unit": units[0],
        "quality_code": draw(st.sampled_from(["GOOD", "BAD", "UNCERTAIN"])),
        "source": draw(st.text(max_size=20).filter(lambda s: "\x00" not in s)),
    }


def identities(points: list[dict[str, Any]]) -> int:
    return len({(p["well_id"], p["parameter_name"], p["timestamp"]) for p in points})


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def broken_body(draw: st.DrawFn, well: str) -> bytes:
    """A payload that is wrong in one of the ways clients get it wrong."""
    points = draw(st.lists(valid_point(well), min_size=1, max_size=5))
    payload: dict[str, Any] = {"data_points": points}
    kind = draw(st.sampled_from(["drop", "retype", "truncate", "bytes", "root", "count"]))
    if kind == "drop":
        point = draw(st.sampled_from(points))
        del point[
            draw(st.sampled_from(["well_id", "timestamp", "parameter_name", "value", "unit"]))
        ]
    elif kind == "retype":
        point = draw(st.sampled_from(points))
        point[draw(st.sampled_from(sorted(point)))] = draw(JUNK)
    elif kind == "truncate":
        text = json.dumps(payload)
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    elif kind == "bytes":
        return draw(st.binary(max_size=200))
    elif kind == "root":
        return json.dumps(draw(JUNK)).encode()
    else:
        payload["data_points"] = points * 1001 if draw(st.booleans()) else []
    return json.dumps(payload).encode()


async def rows_of(db: asyncpg.Connection, tenant: str, well: str) -> int:
    count: int = await db.fetchval(
        f'SELECT count(*) FROM "{tenant}_streams".real_time_parameters WHERE well_id = $1', well
    )
    return count


@PROPERTY_SETTINGS
@given(data=st.data())
async def test_valid_payloads_are_stored_exactly_once(
    rest: httpx.AsyncClient,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    data: st.DataObject,
) -> None:
    well = f"W_{secrets.token_hex(6)}"
    points = data.draw(st.lists(valid_point(well), min_size=1, max_size=30))
    headers = {"authorization": f"Bearer {make_token(tenant)}"}
    first = await rest.post(
        REALTIME, json={"tenant_id": tenant, "data_points": points}, headers=headers
    )
    assert first.status_code == 200, first.text
    assert first.json()["accepted_count"] == identities(points)
    again = await rest.post(REALTIME, json={"data_points": points}, headers=headers)
    assert again.status_code == 200 and again.json()["accepted_count"] == 0
    assert await rows_of(db, tenant, well) == identities(points)


@PROPERTY_SETTINGS
@given(data=st.data())
async def test_broken_payloads_get_a_documented_4xx_and_store_nothing(
    rest: httpx.AsyncClient,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    data: st.DataObject,
) -> None:
    well = f"W_{secrets.token_hex(6)}"
    body = data.draw(broken_body(well))
    response = await rest.post(
        REALTIME,
        content=body,
        headers={
            "authorization": f"Bearer {make_token(tenant)}",
            "content-type": "application/json",
        },
    )
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        # A retyped field can still be valid JSON for the contract (e.g. a number as text, or
        # an unknown key, which the transcoder ignores); then points are stored, once.
        return
    assert response.status_code in (400, 413), response.text
    answer = response.json()
    assert answer["error"] in ("validation_error", "payload_too_large")
    assert await rows_of(db, tenant, well) == 0
