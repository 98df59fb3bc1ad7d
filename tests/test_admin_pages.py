"""The admin pages without a browser: who may act (403 without the permission), CSRF, the
admin log, and a list of 10,000 dead letters that stays paginated and searchable.

Dead letters are made through the store itself (no worker needed to park a key); the pages
run in a Django subprocess (tests/apps/admin_site) on the same Redis namespace.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import redis

from celery_partitioning.cli.deadletters import replay_target
from celery_partitioning.store.deadletters import DeadLetter, DeadLetterStore, now_iso
from celery_partitioning.store.keys import RedisKeys
from tests.support.django_site import run_django

pytestmark = pytest.mark.integration

#: Where the gate would push a replay (unused while a key stays parked).
QUEUE = "partition.entity.0"


def raw(task_id: str, task: str = "fail.step", seq: int = 0) -> str:
    return json.dumps({"body": "", "headers": {"id": task_id, "task": task,
                                               "argsrepr": f"('p', {seq})", "kwargsrepr": "{}"},
                       "properties": {"correlation_id": task_id, "delivery_tag": task_id}})


def park(store: DeadLetterStore, key: str, task_id: str, behind: int = 0,
         task: str = "fail.step") -> None:
    """Dead-letter ``task_id`` (parking ``key``) and set ``behind`` messages aside behind it."""
    letter = DeadLetter(pool="entity", key=key, task=task, id=task_id, args="('p', 0)",
                        kwargs="{}", error=f"ValueError: poison {key}",
                        traceback="Traceback (most recent call last):\nValueError", attempts=1,
                        failed_at=now_iso(), raw=raw(task_id, task))
    assert store.dead_letter(letter, QUEUE)
    for seq in range(1, behind + 1):
        verdict = store.gate("entity", key, f"{task_id}-{seq}", raw(f"{task_id}-{seq}", task, seq),
                             QUEUE)
        assert verdict == "parked"


ACTS = """
key = os.environ["CP_KEY"]
viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
operator = User.objects.create_user("operator", password="pw", is_staff=True)
operator.user_permissions.add(OPERATE)
out = {}
anonymous = Client()
out["anonymous"] = anonymous.get("/admin/partitioning/dead-letters/").status_code

def session(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/admin/")  # the admin's logout form sets the CSRF cookie
    return client, client.cookies["csrftoken"].value

detail = {"pool": "entity", "key": key}
for name, user in (("viewer", viewer), ("operator", operator)):
    client, token = session(user)
    page = client.get("/admin/partitioning/dead-letters/one/", detail).content.decode()
    out[name] = {
        "partitions": client.get("/admin/partitioning/").status_code,
        "listed": key in client.get("/admin/partitioning/dead-letters/").content.decode(),
        "buttons": 'value="skip"' in page, "parked_shown": page.count("fail.step"),
        "no_token": client.post("/admin/partitioning/dead-letters/action/",
                                {"action": "skip", **detail}).status_code,
        "get_action": client.get("/admin/partitioning/dead-letters/action/").status_code,
    }
    response = client.post("/admin/partitioning/dead-letters/action/",
                           {"action": "skip", "csrfmiddlewaretoken": token, **detail})
    out[name]["post"] = response.status_code
    out[name]["location"] = response.get("Location")
    out[name]["after"] = client.get("/admin/partitioning/dead-letters/one/", detail).status_code
out["log"] = [(e.user.username, e.object_repr, e.change_message) for e in LogEntry.objects.all()]
print("RESULT " + json.dumps(out))
"""


def _result(done: object) -> dict[str, object]:
    stdout = getattr(done, "stdout", "")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"{stdout}\n{getattr(done, 'stderr', '')}"
    found: dict[str, object] = json.loads(lines[-1][len("RESULT "):])
    return found


def test_only_staff_with_the_permission_may_act_and_every_action_is_logged(
    fa: ModuleType, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    store = DeadLetterStore(client, RedisKeys(fa.NS))
    key = "Order:perm-1"
    # Given a parked key with two messages behind it
    park(store, key, "t-perm-0", behind=2)
    # When a staff user without the permission, then one with it, skip it (CSRF token and all)
    out = _result(run_django(fa, tmp_path / "db.sqlite3", ACTS, CP_KEY=key))
    viewer, operator = out["viewer"], out["operator"]
    assert isinstance(viewer, dict) and isinstance(operator, dict)
    # Then anonymous users go to the login page; both staff users read every page
    assert out["anonymous"] == 302
    assert viewer["partitions"] == operator["partitions"] == 200
    assert viewer["listed"] and operator["listed"]
    # And the dead letter's page shows both parked messages and the failed one to both
    assert viewer["parked_shown"] == operator["parked_shown"] >= 3
    # And only the operator sees the buttons; a GET of the action is refused for both
    assert (viewer["buttons"], operator["buttons"]) == (False, True)
    assert viewer["get_action"] == operator["get_action"] == 405
    # And a POST without the CSRF token is refused (403) for both, the viewer's with it too
    assert viewer["no_token"] == operator["no_token"] == 403
    assert viewer["post"] == 403 and viewer["after"] == 200
    # And the operator's skip went through: redirected to the list, the key is no longer parked
    assert (operator["post"], operator["location"]) == (302, "/admin/partitioning/dead-letters/")
    assert operator["after"] == 404 and not store.is_parked("entity", key)
    # And the parked messages are at the head of the partition queue, in order
    queue, _ = replay_target(fa.app, "entity", key)
    queued = [json.loads(m)["headers"]["id"] for m in
              reversed(client.lrange(RedisKeys(fa.NS).broker_queue(queue), 0, -1))]
    assert queued == ["t-perm-0-1", "t-perm-0-2"]
    # And the admin log says who did what to how many messages; the store logged the skip
    log = out["log"]
    assert isinstance(log, list)
    ((user, obj, message),) = log
    assert (user, obj) == ("operator", f"partition key {key}")
    assert "skipped t-perm-0" in message and "released 2 parked message(s)" in message
    (event,) = store.history("entity")
    assert (event["action"], event["key"]) == ("skip", key)


MANY = """
timings = {}
user = User.objects.create_user("viewer", password="pw", is_staff=True)
client = Client()
client.force_login(user)
def timed(name, path, params=None):
    started = time.monotonic()
    response = client.get(path, params or {})
    timings[name] = round(time.monotonic() - started, 3)
    assert response.status_code == 200, (name, response.status_code)
    return response.content.decode()
first = timed("first page", "/admin/partitioning/dead-letters/")
last = timed("last page", "/admin/partitioning/dead-letters/", {"page": 200})
by_key = timed("key search", "/admin/partitioning/dead-letters/", {"q": "many-9999"})
by_task = timed("task search", "/admin/partitioning/dead-letters/", {"task": "other", "page": 3})
timed("partitions", "/admin/partitioning/")
rows = lambda page: page.count("<tr data-key=")
out = {"timings": timings, "rows": [rows(first), rows(last), rows(by_key), rows(by_task)],
       "totals": [p.split('id="cp-total">')[1].split("<")[0] for p in (first, by_key, by_task)],
       "last_key": "Order:many-9999" in last, "found": "Order:many-9999" in by_key}
print("RESULT " + json.dumps(out))
"""


def test_ten_thousand_dead_letters_list_in_pages_and_search_by_key_and_task(
    fa: ModuleType, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    store = DeadLetterStore(client, RedisKeys(fa.NS))
    # Given 10,000 parked keys (half of them of another task), created oldest first
    for i in range(10_000):
        park(store, f"Order:many-{i:04d}", f"t-many-{i}", task="fail.other" if i % 2 else "fail.step")
    # When a staff user lists, pages and searches them
    out = _result(run_django(fa, tmp_path / "db.sqlite3", MANY))
    print("timings (s):", out["timings"])
    # Then each page holds 50; the last page (200) ends with the newest
    assert out["rows"] == [50, 50, 1, 50]
    assert out["last_key"] and out["found"]
    assert out["totals"] == ["10000 dead letters, page 1 of 200", "1 dead letter",
                             "5000 dead letters, page 3 of 100"]
    # And no page takes long (generous: the CI box is loaded; measured 0.4-0.7 s a list page, 1.3 s the
    # partitions page, on a loaded 2-core box)
    timings = out["timings"]
    assert isinstance(timings, dict)
    assert max(timings.values()) < 30, timings


REPLAY_DISCARD = """
operator = User.objects.create_user("operator", password="pw", is_staff=True)
operator.user_permissions.add(OPERATE)
client = Client()
client.force_login(operator)
odd, other = os.environ["CP_KEY"], os.environ["CP_OTHER"]
listed = client.get("/admin/partitioning/dead-letters/", {"q": "a/b"}).content.decode()
link = listed.split('<tr data-key="')[1].split('href="')[1].split('"')[0].replace("&amp;", "&")
page = client.get(link).content.decode()
out = {"link": link, "shown": odd.replace("&", "&amp;") in page}
replay = client.post("/admin/partitioning/dead-letters/action/",
                     {"action": "replay", "pool": "entity", "key": odd, "next": link}, follow=True)
out["replay"] = [str(m) for m in replay.context["messages"]]
out["after_replay"] = "cp-not-parked" in replay.content.decode()
again = client.post("/admin/partitioning/dead-letters/action/",
                    {"action": "replay", "pool": "entity", "key": odd}, follow=True)
out["again"] = [str(m) for m in again.context["messages"]]
discard = client.post("/admin/partitioning/dead-letters/action/",
                      {"action": "discard", "pool": "entity", "key": other,
                       "next": "https://elsewhere.example/"})
out["discard"] = (discard.status_code, discard["Location"])
out["log"] = sorted((e.action_flag, e.object_repr) for e in LogEntry.objects.all())
print("RESULT " + json.dumps(out))
"""


def test_replay_and_discard_from_the_pages_do_what_the_command_does(
    fa: ModuleType, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    store = DeadLetterStore(client, RedisKeys(fa.NS))
    # Given a parked key whose text needs escaping in URLs and HTML, and another parked key
    odd, other = "Order:a/b c&d?e=1", "Order:other"
    park(store, odd, "t-odd-0", behind=2)
    park(store, other, "t-other-0", behind=1)
    # When the operator finds the first by a search, follows its link, replays it (twice),
    # and discards the other, asking to be sent to another site afterwards
    out = _result(run_django(fa, tmp_path / "db.sqlite3", REPLAY_DISCARD, CP_KEY=odd,
                             CP_OTHER=other))
    # Then the link led to that key's page
    assert out["shown"], out["link"]
    # And the replay put the failed message, then the parked ones, at the queue's head in order
    replayed, again = out["replay"], out["again"]
    assert isinstance(replayed, list) and isinstance(again, list)
    (said,) = replayed
    assert said == f"replayed 3 message(s) of key {odd!r} (pool entity) to " + \
        replay_target(fa.app, "entity", odd)[0] + "; the key is unparked"
    assert out["after_replay"] and not store.is_parked("entity", odd)
    queue = RedisKeys(fa.NS).broker_queue(replay_target(fa.app, "entity", odd)[0])
    assert [json.loads(m)["headers"]["id"] for m in reversed(client.lrange(queue, 0, -1))][:3] \
        == ["t-odd-0", "t-odd-0-1", "t-odd-0-2"]
    # And replaying again changed nothing and said why
    (refused,) = again
    assert "is not parked: it was replayed at" in refused
    # And the discard dropped both messages of the other key (logged), redirecting only here
    assert out["discard"] == [302, "/admin/partitioning/dead-letters/"]
    assert not store.is_parked("entity", other)
    assert [e["action"] for e in store.history("entity")] == ["replay", "discard"]
    assert out["log"] == [[2, f"partition key {odd}"], [3, f"partition key {other}"]]


UNREACHABLE = """
user = User.objects.create_user("viewer", password="pw", is_staff=True)
client = Client()
client.force_login(user)
out = {}
for path in ("/admin/partitioning/", "/admin/partitioning/dead-letters/",
             "/admin/partitioning/dead-letters/one/?pool=entity&key=Order:x"):
    response = client.get(path)
    body = response.content.decode()
    out[path] = [response.status_code, body.split('class="errornote">')[1].split("<")[0]]
admin = User.objects.create_superuser("admin", password="pw")
client.force_login(admin)
index = client.get("/admin/celery_partitioning/").content.decode()
out["app index"] = [int('id="cp-pages"' in index), int('href="/admin/partitioning/"' in index)]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_without_redis_the_pages_say_so_and_the_app_index_links_to_them(tmp_path: Path) -> None:
    # Given an app whose broker and store (a closed port) cannot be reached
    nowhere = SimpleNamespace(REDIS_URL="redis://127.0.0.1:1/0", BROKER_URL="redis://127.0.0.1:1/0",
                              NS="cptest-nowhere:")
    # When a staff user opens each page
    out = _result(run_django(nowhere, tmp_path / "db.sqlite3", UNREACHABLE))
    # Then each answers 503 and says what cannot be reached
    # And the app's admin index links to the pages (no Redis needed for that)
    assert out.pop("app index") == [1, 1]
    assert len(out) == 3
    for path, found in out.items():
        assert isinstance(found, list)
        status, said = found
        assert status == 503, path
        assert said.startswith("Redis (the broker or the partitioning store) cannot be reached"), said


PAUSES = """
key = os.environ["CP_KEY"]
viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
operator = User.objects.create_user("operator", password="pw", is_staff=True)
operator.user_permissions.add(OPERATE)

def session(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/admin/")  # the admin's logout form sets the CSRF cookie
    return client, client.cookies["csrftoken"].value

def post(client, token, **data):
    return client.post("/admin/partitioning/pause/", {**data, "csrfmiddlewaretoken": token},
                       follow=True)

def said(response):
    return [str(m) for m in response.context["messages"]]

out = {}
for name, user in (("viewer", viewer), ("operator", operator)):
    client, token = session(user)
    page = client.get("/admin/partitioning/").content.decode()
    out[name] = {
        "shown": f'data-paused-key="{key}"' in page and "alice" in page,
        "buttons": 'value="resume"' in page or 'value="pause"' in page,
        "no_token": client.post("/admin/partitioning/pause/",
                                {"action": "pause", "pool": "entity", "partition": "1"}).status_code,
        "get": client.get("/admin/partitioning/pause/").status_code,
    }
client, token = session(viewer)
out["viewer"]["post"] = client.post("/admin/partitioning/pause/", {
    "action": "resume", "pool": "entity", "key": key, "csrfmiddlewaretoken": token}).status_code
client, token = session(operator)
out["pause_partition"] = said(post(client, token, action="pause", pool="entity", partition="1"))
page = client.get("/admin/partitioning/").content.decode()
out["partition_shown"] = "PAUSED</strong>" in page and "by operator" in page
out["resume_key"] = said(post(client, token, action="resume", pool="entity", key=key))
out["again"] = said(post(client, token, action="resume", pool="entity", key=key))
out["resume_partition"] = said(post(client, token, action="resume", pool="entity", partition="1"))
out["pause_key"] = said(post(client, token, action="pause", pool="entity", key="Order:new"))
out["neither"] = said(post(client, token, action="pause", pool="entity"))
out["log"] = [(e.user.username, e.object_repr, e.change_message) for e in LogEntry.objects.order_by("id")]
print("RESULT " + json.dumps(out))
"""


def test_pause_and_resume_from_the_partitions_page_need_the_permission_and_are_logged(
    fa: ModuleType, tmp_path: Path
) -> None:
    from celery_partitioning.hashing import partition_for
    from celery_partitioning.store.pausing import PauseStore

    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    store = DeadLetterStore(client, RedisKeys(fa.NS))
    pauses = PauseStore(store)
    key = "Order:pause-1"
    queue, _ = replay_target(fa.app, "entity", key)
    # Given a key paused from the CLI by alice, with two messages set aside
    pauses.pause_key("entity", key, partition_for(key, 2), "alice")
    for task_id in ("t-pause-1", "t-pause-2"):
        assert store.gate("entity", key, task_id, raw(task_id), queue) == "paused"
    # When a staff user without the permission, then one with it, use the page
    out = _result(run_django(fa, tmp_path / "db.sqlite3", PAUSES, CP_KEY=key))
    viewer, operator = out["viewer"], out["operator"]
    assert isinstance(viewer, dict) and isinstance(operator, dict)
    # Then both see the paused key and who paused it; only the operator gets the buttons
    assert viewer["shown"] and operator["shown"]
    assert (viewer["buttons"], operator["buttons"]) == (False, True)
    # And no POST without the CSRF token, no GET, and none by the viewer goes through
    assert viewer["no_token"] == operator["no_token"] == 403
    assert viewer["get"] == operator["get"] == 405
    assert viewer["post"] == 403
    # And the operator pauses partition 1 (shown as paused by them), resumes the key (its two
    # messages go to the head of its queue in order), resumes the partition, pauses a key
    assert out["pause_partition"] == ["paused partition entity.1: its worker stops between two "
                                      "messages"]
    assert out["partition_shown"]
    assert out["resume_key"] == [f"resumed key {key!r} of pool entity: released 2 message(s), "
                                 "in order, ahead of newer ones"]
    queued = [json.loads(m)["headers"]["id"] for m in
              reversed(client.lrange(RedisKeys(fa.NS).broker_queue(queue), 0, -1))]
    assert queued == ["t-pause-1", "t-pause-2"]
    again = out["again"]
    assert isinstance(again, list) and "is not paused: it was resumed at" in again[0]
    assert "by operator" in again[0]
    assert out["resume_partition"] == ["resumed partition entity.1: its worker fetches again"]
    assert out["pause_key"] == ["paused key 'Order:new' of pool entity: its messages are set "
                                "aside in order"]
    assert out["neither"] == ["pause and resume need a pool and either a key or a partition"]
    (pause,) = pauses.paused(["entity"])
    assert (pause.key, pause.by) == ("Order:new", "operator")
    # And every action is in the admin log (who, what, how many messages)
    log = out["log"]
    assert isinstance(log, list) and [(u, o) for u, o, _ in log] == [
        ("operator", "partition entity.1"), ("operator", f"partition key {key}"),
        ("operator", "partition entity.1"), ("operator", "partition key Order:new")]
    assert '"messages": 2' in log[1][2]
