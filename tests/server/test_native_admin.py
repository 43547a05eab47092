"""Loading and unloading adapters at run time on the real native engine, with requests in flight."""

from __future__ import annotations

import json

import httpx
import pytest

from .helpers import auth, sse_data


@pytest.fixture(scope="module")
def client(native_server):
    url, _ = native_server
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def names(client, tenant="root") -> list[str]:
    return sorted(a["name"] for a in client.get("/v1/adapters", headers=auth(tenant)).json()["data"])


@pytest.mark.parametrize(
    "tenant,method,path,body,status",
    [
        ("acme", "POST", "/admin/adapters", {"path": "/x"}, 403),
        ("globex", "DELETE", "/admin/adapters/alpha", None, 403),
        ("root", "DELETE", "/admin/adapters/nope", None, 404),
        ("root", "POST", "/admin/adapters", {"path": "/no/such/dir"}, 422),
        ("root", "POST", "/admin/adapters", {"name": "x"}, 422),
    ],
)
def test_admin_refusals(client, tenant, method, path, body, status):
    r = client.request(method, path, json=body, headers=auth(tenant))
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_load_use_and_unload_while_a_request_is_in_flight(client, tiny_adapters):
    r = client.post(
        "/admin/adapters", json={"path": str(tiny_adapters["gamma"]), "name": "gamma"}, headers=auth("root")
    )
    assert r.status_code == 201, r.text
    assert (r.json()["name"], r.json()["r_max"], r.json()["train_ranks"]) == ("gamma", 2, [1, 2])
    assert names(client) == ["alpha", "beta", "gamma"]
    assert names(client, "acme") == ["alpha"]  # not in acme's list
    body = {"prompt": "a b c", "adapter": "gamma", "rank": 2, "max_tokens": 150, "stream": True}
    with client.stream("POST", "/generate", json=body, headers=auth("root")) as stream:
        lines = stream.iter_lines()
        first = json.loads(next(lines)[len("data: ") :])
        assert (first["type"], first["rank"]) == ("start", 2)
        # unload while the stream runs: new requests are refused at once, the running one finishes
        deleted = client.delete("/admin/adapters/gamma", headers=auth("root"))
        assert deleted.status_code == 200 and deleted.json() == {"name": "gamma", "unloaded": True}
        refused = client.post("/generate", json={"prompt": "x", "adapter": "gamma"}, headers=auth("root"))
        assert refused.status_code == 404
        events = [json.loads(d) for d in sse_data(lines)]
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] in ("stop", "length")
    assert names(client) == ["alpha", "beta"]


def test_replacing_an_adapter_in_place(client, tiny_adapters):
    """Loading under an existing name replaces it (beta's directory, served as a second name, then dropped)."""
    r = client.post("/admin/adapters", json={"path": str(tiny_adapters["beta"]), "name": "beta2"}, headers=auth("root"))
    assert r.status_code == 201
    again = client.post(
        "/admin/adapters", json={"path": str(tiny_adapters["alpha"]), "name": "beta2"}, headers=auth("root")
    )
    assert again.status_code == 201 and again.json()["r_max"] == 8
    text = client.post(
        "/generate", json={"prompt": "x y", "adapter": "beta2", "rank": 8, "max_tokens": 6}, headers=auth("root")
    ).json()["text"]
    same = client.post(
        "/generate", json={"prompt": "x y", "adapter": "alpha", "rank": 8, "max_tokens": 6}, headers=auth("root")
    ).json()["text"]
    assert text == same  # the same weights under another name
    assert client.delete("/admin/adapters/beta2", headers=auth("root")).status_code == 200
