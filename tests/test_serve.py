"""The HTTP service (`llmrec.server`, `llmrec.service`, `recipes/serve.py`) on a tiny random bundle: routes,
error bodies, batching equivalence, concurrent changes against a serial replay, the journal after SIGKILL
and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import perturb_trainable, recipe_main
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from test_recommender import N_ITEMS, N_USERS, data  # noqa: F401  (data is a fixture)

from common.errors import run_cli
from common.io import ArtifactError
from common.journal import Journal
from data_prep import load_bundle
from llmrec.backbone import BackboneConfig
from llmrec.export import export_model
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.recommender import Recommender
from llmrec.server import create_app
from llmrec.service import Service, serial_replay

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory) -> Path:  # noqa: F811
    b = load_bundle(data)
    config = ModelConfig(lora_r=2, head="untied", history_pool="mean")
    model = CLLM4Rec.from_config(config, BackboneConfig("tiny-llama"), b.n_users, b.n_items, seed=3)
    perturb_trainable(model)
    return export_model(model, b, tmp_path_factory.mktemp("serve") / "bundle")


def load(bundle: Path) -> Recommender:
    return Recommender.from_pretrained(bundle, device="cpu")


def wait_ready(get, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            response = get("/healthz")
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the service was not ready in time")


@pytest.fixture(scope="module")
def client(bundle):
    """A client of the app over the bundle (read-only tests), and the recommender it serves."""
    rec = load(bundle)
    app = create_app(lambda registry: Service(rec, registry=registry))
    with TestClient(app) as client:
        wait_ready(client.get)
        yield client, rec


def listed(answer: dict) -> list[tuple[str, float]]:
    return [(r["item"], r["score"]) for r in answer["items"]]


def same_list(got: list[tuple[str, float]], expected: list) -> bool:
    return [item for item, _ in got] == [r.item for r in expected] and all(
        abs(score - r.score) <= TOLERANCE for (_, score), r in zip(got, expected, strict=True)
    )


def test_routes_answer_what_the_recommender_gives(client):
    client, rec = client
    assert client.get("/healthz").json() == {"status": "ready", "users": N_USERS, "items": N_ITEMS}
    user = rec.catalogue.user_ids[3]
    exclude = rec.recommend(user, k=2)[0].item
    got = client.get(f"/users/{user}/recommendations", params={"k": 5, "exclude": [exclude]}).json()
    assert same_list(listed(got), rec.recommend(user, k=5, exclude=[exclude])) and got["version"] == 0
    history = rec.catalogue.item_ids[:3]
    got = client.post("/recommendations", json={"history": history, "k": 4}).json()
    assert same_list(listed(got), rec.recommend(history=history, k=4))
    assert [h["item"] for h in client.get(f"/users/{user}").json()["history"]] == rec.history(user)
    item = rec.catalogue.item_ids[5]
    assert client.get(f"/items/{item}").json() == {
        "item": item, "index": 5, "title": rec.catalogue.item_titles[5], "text": None, "version": 0
    }  # fmt: skip
    found = client.get("/items", params={"q": "NUMBER 1", "limit": 3}).json()["items"]
    assert [f["title"] for f in found] == [t for t in rec.catalogue.item_titles if "number 1" in t][:3]
    assert "/users/{user}/recommendations" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200 and "<script>" in client.get("/").text
    metrics = client.get("/metrics").text
    assert 'llmrec_http_requests_total{route="/recommendations",status="200"}' in metrics
    assert 'llmrec_http_request_seconds_bucket{le="0.001",route="/items/{item}"}' in metrics
    assert 'llmrec_batch_size_count{kind="history"}' in metrics and "llmrec_user_cache_total" in metrics


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("GET", "/users/nobody/recommendations", None, 404, "unknown user id 'nobody'"),
        (
            "GET",
            "/users/u1/recommendations?k=0",
            None,
            422,
            "query.k: Input should be greater than or equal to 1",
        ),
        ("GET", "/users/u1/recommendations?k=ten", None, 422, "query.k: Input should be a valid integer"),
        ("GET", "/users/u1/recommendations?exclude=zz", None, 404, "unknown item id 'zz' at position 0"),
        ("POST", "/recommendations", {"history": []}, 422, "body.history: List should have at least 1 item"),
        ("POST", "/recommendations", {"history": ["m1", "zz"]}, 404, "unknown item id 'zz' at position 1"),
        ("POST", "/recommendations", {"history": ["m1"], "user": "u1"}, 422, "body.user: Extra inputs"),
        ("POST", "/recommendations", b'{"history": [', 422, "JSON decode error"),
        ("POST", "/users/nobody/interactions", {"items": ["m1"]}, 404, "unknown user id 'nobody'"),
        ("POST", "/items", {"items": [{"id": "m1", "title": "x"}]}, 422, "'m1' is already in the catalogue"),
        (
            "POST",
            "/items",
            {"items": [{"id": "new", "title": " "}]},
            422,
            "field 'title' is missing or empty",
        ),
        ("GET", "/items/zz", None, 404, "unknown item id 'zz'"),
        ("POST", "/recommendations", b"[" + b"1," * 600_000 + b"1]", 413, "request body over the limit"),
    ],
)
def test_bad_requests_get_a_one_line_4xx(client, method, path, body, status, words):
    client, _ = client
    content = body if isinstance(body, bytes) else None
    response = client.request(
        method,
        path,
        json=None if content else body,
        content=content,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert words in detail and "\n" not in detail


def test_a_streamed_body_over_the_limit_is_refused(client):
    client, _ = client
    chunks = (b"x" * 1024 for _ in range(2048))  # no Content-Length: counted as it arrives
    response = client.post("/recommendations", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]


def test_healthz_is_503_until_the_bundle_is_loaded(bundle):
    release = threading.Event()

    def slow(registry: CollectorRegistry) -> Service:
        release.wait(30)
        return Service(load(bundle), registry=registry)

    with TestClient(create_app(slow)) as client:
        assert client.get("/healthz").json()["status"] == "loading"
        response = client.get("/users/u1/recommendations")
        assert response.status_code == 503 and response.json()["detail"] == "the bundle is still loading"
        release.set()
        assert wait_ready(client.get)["items"] == N_ITEMS
    with TestClient(create_app(lambda registry: load(bundle.parent / "absent"))) as client:
        time.sleep(0.2)
        response = client.get("/healthz")
        assert response.status_code == 503 and response.json()["status"] == "failed"
        assert "absent: no such bundle directory" in response.json()["detail"]


def test_concurrent_histories_share_one_forward_and_equal_single_calls(bundle):
    rec, registry = load(bundle), CollectorRegistry()
    service = Service(rec, max_batch=8, max_wait_ms=2000, registry=registry)
    ids = rec.catalogue.item_ids
    histories = [ids[i : i + 1 + i % 4] for i in range(8)]  # prompts of different lengths: padding
    futures = [service.recommend_history(h, k=5 + i % 3) for i, h in enumerate(histories)]
    answers = [f.result(timeout=60) for f in futures]
    users = [service.recommend_user(u, k=6) for u in rec.catalogue.user_ids[:5]]
    users = [f.result(timeout=60) for f in users]
    bad = [service.recommend_history(h, k=5) for h in [ids[:2], ["zz"], ids[3:5]]]
    service.close()
    batches = registry.get_sample_value("llmrec_batch_size_count", {"kind": "history"})
    assert (batches, registry.get_sample_value("llmrec_batch_size_sum", {"kind": "history"})) == (2, 11)
    for i, (history, answer) in enumerate(zip(histories, answers, strict=True)):
        assert same_list(listed(answer), rec.recommend(history=history, k=5 + i % 3))
    for user, answer in zip(rec.catalogue.user_ids, users, strict=False):
        assert same_list(listed(answer), rec.recommend(user, k=6))
    assert same_list(listed(bad[0].result()), rec.recommend(history=ids[:2], k=5))
    assert same_list(listed(bad[2].result()), rec.recommend(history=ids[3:5], k=5))
    with pytest.raises(ValueError, match="unknown item id 'zz'"):
        bad[1].result()


def sample(text: str, name: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_known_answers_are_kept_until_the_next_change(bundle):
    rec, registry = load(bundle), CollectorRegistry()
    service = Service(rec, registry=registry)
    user, other = rec.catalogue.user_ids[2], rec.catalogue.user_ids[5]
    first = service.recommend_user(user, k=4).result(timeout=60)
    again = service.recommend_user(user, k=4)
    assert again.done() and again.result() == first  # from the kept answers, on this thread
    again.result()["items"][0]["score"] = 99.0  # a caller's copy: the kept answer is untouched
    assert service.recommend_user(user, k=4).result() == first
    assert service.recommend_user(user, k=3).result(timeout=60)["items"] == first["items"][:3]
    assert service.update(other, [rec.catalogue.item_ids[0]]).result(timeout=60)["version"] == 1
    after = service.recommend_user(user, k=4).result(timeout=60)
    service.close()
    assert after["version"] == 1 and same_list(listed(after), rec.recommend(user, k=4))
    scored = registry.get_sample_value("llmrec_batch_size_sum", {"kind": "user"})
    hits = registry.get_sample_value("llmrec_answer_cache_total", {"result": "hit"})
    misses = registry.get_sample_value("llmrec_answer_cache_total", {"result": "miss"})
    assert (scored, hits, misses) == (3, 2, 3)  # k=4, k=3 and k=4 after the change were scored

    one = Service(load(bundle), answer_cache=1)
    for asked in (user, other, user):
        assert not one.recommend_user(asked, k=4).done()  # one kept at a time: each is scored again
        one.recommend_user(asked, k=4).result(timeout=60)
    one.close()


def test_a_kept_answer_is_sent_before_fastapi_with_the_same_body_and_metrics(client, monkeypatch):
    client, rec = client
    route = 'llmrec_http_requests_total{route="/users/{user}/recommendations",status="200"}'
    user = rec.catalogue.user_ids[7]
    before = client.get("/metrics").text
    first = client.get(f"/users/{user}/recommendations?k=3&exclude={rec.catalogue.item_ids[1]}")
    monkeypatch.setattr(client.app.state.service, "recommend_user", None)  # the route is not reached
    second = client.get(f"/users/{user}/recommendations?exclude={rec.catalogue.item_ids[1]}&k=3")
    after = client.get("/metrics").text
    assert first.status_code == second.status_code == 200 and first.content == second.content
    assert first.headers["content-type"] == second.headers["content-type"] == "application/json"
    assert sample(after, route) - sample(before, route) == 2
    hit = 'llmrec_answer_cache_total{result="hit"}'
    assert sample(after, hit) - sample(before, hit) == 1
    monkeypatch.undo()
    assert client.get(f"/users/{user}/recommendations?k=0").status_code == 422  # validated as before
    assert client.get(f"/users/{user}/recommendations?k=3&k=x").status_code == 422


def test_concurrent_reads_and_changes_equal_a_serial_replay(bundle):
    """Four threads mix reads, updates and new items; each answer's version says which changes it saw,
    and a fresh recommender given the changes one by one answers every read the same."""
    service = Service(load(bundle), max_batch=8, max_wait_ms=2)
    ids, users = load(bundle).catalogue.item_ids, [f"u{u}" for u in range(N_USERS)]
    calls: list[tuple[str, dict, object]] = []

    def client(seed: int) -> None:
        for step in range(12):
            n = seed * 100 + step
            if step % 4 == 1:
                call = ("update", {"user": users[n % N_USERS], "items": [ids[n % N_ITEMS]]})
            elif step % 6 == 5:
                call = (
                    "add_items",
                    {"items": [{"id": f"new{n}", "title": f"A new film {n}", "text": "drama"}]},
                )
            elif step % 2:
                call = ("history", {"history": [ids[(n * 7) % N_ITEMS], ids[n % N_ITEMS]], "k": 5})
            else:
                call = ("user", {"user": users[(n * 3) % N_USERS], "k": 5})
            submit = {
                "user": service.recommend_user, "history": service.recommend_history,
                "update": service.update, "add_items": service.add_items,
            }[call[0]]  # fmt: skip
            calls.append((*call, submit(**call[1]).result(timeout=120)))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    service.close()
    changes = [c for c in calls if c[0] in ("update", "add_items")]
    assert sorted(c[2]["version"] for c in changes) == list(range(1, len(changes) + 1)) and len(changes) >= 8
    assert serial_replay(load(bundle), calls) == []
    read = next(c for c in reversed(calls) if c[0] in ("user", "history"))
    read[2]["items"][0]["score"] += 0.01  # the check sees a wrong answer
    assert len(serial_replay(load(bundle), calls)) == 1


def test_journal_keeps_whole_records_and_refuses_another_owner(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, "bundle:a")
    journal.append({"op": "update", "user": "u1", "items": ["m1"]})
    with open(path, "ab") as handle:
        handle.write(b'{"op": "upd')  # a crash in the middle of a write that was never acknowledged
    assert Journal(path, "bundle:a").records == [{"op": "update", "user": "u1", "items": ["m1"]}]
    assert path.read_bytes().endswith(b"]}\n")  # the torn tail is cut off
    with pytest.raises(ArtifactError, match="belongs to 'bundle:a', not to 'bundle:b'"):
        Journal(path, "bundle:b")
    path.write_text(path.read_text().replace('"op"', "op", 1))
    with pytest.raises(ArtifactError, match="line 2: not a JSON record"):
        Journal(path, "bundle:a")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bundle: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        str(REPO / "recipes" / "serve.py"),
        "--bundle",
        str(bundle),
        "--port",
        str(port),
    ]
    return subprocess.Popen(
        [*command, "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_acknowledged_changes_survive_sigkill(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    port = free_port()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    server = start_server(copy, port)
    try:
        wait_ready(http.get)
        new = [{"id": "n1", "title": "A film about trains", "text": "steam"}, {"id": "n2", "title": "Space"}]
        acknowledged = [
            http.post("/items", json={"items": new}),
            http.post("/users/u1/interactions", json={"items": ["n1", "m3"]}),
            http.post("/items", json={"items": [{"id": "n3", "title": "Cooking"}]}),
            http.post("/users/u2/interactions", json={"items": ["n3"]}),
        ]
        assert [r.status_code for r in acknowledged] == [200] * 4
        before = http.get("/users/u1/recommendations", params={"k": 10}).json()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    server = start_server(copy, port)
    try:
        assert wait_ready(http.get)["items"] == N_ITEMS + 3
        assert [http.get(f"/items/{i}").json()["index"] for i in ("n1", "n2", "n3")] == [
            N_ITEMS,
            N_ITEMS + 1,
            N_ITEMS + 2,
        ]
        assert [h["item"] for h in http.get("/users/u1").json()["history"]][-2:] == ["n1", "m3"]
        assert [h["item"] for h in http.get("/users/u2").json()["history"]][-1:] == ["n3"]
        after = http.get("/users/u1/recommendations", params={"k": 10}).json()
        assert after["version"] == before["version"] == 4
        assert [r["item"] for r in after["items"]] == [r["item"] for r in before["items"]]
        assert all(
            abs(a["score"] - b["score"]) <= TOLERANCE
            for a, b in zip(after["items"], before["items"], strict=True)
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_serve_refuses_a_bad_bundle_with_one_line(tmp_path, capsys):
    main = recipe_main("serve")
    assert (
        run_cli(main, ["--bundle", str(tmp_path / "absent"), "--port", str(free_port())], prog="serve.py")
        == 2
    )
    err = capsys.readouterr().err
    assert "serve.py: error: " in err and "absent: no such bundle directory" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = ["--bundle", str(tmp_path / "absent"), "--port", str(taken.getsockname()[1])]
        assert run_cli(main, argv, prog="serve.py") == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    argv = ["--bundle", str(tmp_path / "absent"), "--answer_cache", "-1"]  # refused before the bundle
    assert run_cli(main, argv, prog="serve.py") == 2
    assert "answer_cache >= 0, got 32, 5.0 and -1" in capsys.readouterr().err


class Browser:
    """Headless Chromium driven over the DevTools protocol (``websockets``): evaluate JS in the page."""

    def __init__(self, url: str, profile: Path):
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--window-size=1200,900", "--remote-debugging-port=0", f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 60
        while (
            not (profile / "DevToolsActivePort").exists() or not (profile / "DevToolsActivePort").read_text()
        ):
            assert time.time() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.socket, self.id = connect(pages[0]["webSocketDebuggerUrl"], max_size=None), 0

    def send(self, method: str, **params) -> dict:
        self.id += 1
        self.socket.send(json.dumps({"id": self.id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while not (value := self.js(expression)):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)
        return value

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(30)


ROWS = "[...document.querySelectorAll('#results tbody tr')].map(r => r.cells[1].textContent)"


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs the system's chromium (.ci/run installs it)"
)
def test_the_page_in_headless_chromium(bundle, tmp_path):
    """Load a known user from the address, pick items for a new user, add an item and read its rank."""
    import uvicorn

    rec, port = load(bundle), free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(lambda r: Service(load(bundle), registry=r)), port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_ready(httpx.Client(base_url=f"http://127.0.0.1:{port}").get)
    browser = Browser(f"http://127.0.0.1:{port}/?user=u3", tmp_path / "profile")
    try:
        assert browser.wait(f"{ROWS}.length == 10 && {ROWS}") == [r.item for r in rec.recommend("u3", k=10)]
        history = browser.js("[...document.querySelectorAll('#history li')].map(li => li.textContent)")
        assert history == [
            f"{rec.catalogue.item_titles[i]} ({i_id})"
            for i_id, i in zip(rec.history("u3"), rec.items(rec.history("u3")), strict=True)
        ]
        browser.js(
            "const s = document.getElementById('search'); s.value = 'number 1'; s.dispatchEvent(new Event('input'))"
        )
        browser.wait("document.querySelectorAll('#found li').length > 2")
        browser.js(
            "document.querySelectorAll('#found li')[0].click(); document.querySelectorAll('#found li')[2].click()"
        )
        picked = browser.js(
            "[...document.querySelectorAll('#found li')].slice(0, 3).map(li => li.textContent.match(/\\((.*)\\)$/)[1])"
        )
        browser.js("document.getElementById('history-go').click()")
        expected = [r.item for r in rec.recommend(history=[picked[0], picked[2]], k=10)]
        assert (
            browser.wait(f"JSON.stringify({ROWS}) == JSON.stringify({json.dumps(expected)}) && {ROWS}")
            == expected
        )
        browser.js("""document.getElementById('new-id').value = 'fresh';
                      document.getElementById('new-title').value = 'A film about trains';
                      document.getElementById('new-text').value = 'Steam engines cross the mountains.';
                      document.getElementById('add-go').click()""")
        added = browser.wait("document.getElementById('added').textContent")
        rec.add_items(
            [{"id": "fresh", "title": "A film about trains", "text": "Steam engines cross the mountains."}]
        )
        ranking = [r.item for r in rec.recommend(history=[picked[0], picked[2]], k=rec.n_items)]
        assert f"ranks #{ranking.index('fresh') + 1} of {len(ranking)} for the picked items" in added
        assert browser.js("document.getElementById('error').textContent") == ""
        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
        (tmp_path / "page.png").write_bytes(shot)
    finally:
        browser.close()
        server.should_exit = True
        thread.join(30)


def test_the_service_loads_no_training_code():
    from test_architecture import TRAINING_STACK, fresh_modules

    loaded = fresh_modules("import llmrec.server")
    assert "llmrec.service" in loaded and "fastapi" in loaded
    assert sorted(m for m in loaded if any(m == s or m.startswith(s + ".") for s in TRAINING_STACK)) == []
