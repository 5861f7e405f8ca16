"""Two Keel processes starting embedded Ray clusters at once (two `keel run`s, or pytest -n 2) race for the
dashboard's port: free when checked, taken when bound. The loser retries on another port."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration

PROBE = """
import socket
import orchestrator.ray_session as rs
held = socket.socket(); held.bind(("127.0.0.1", 0)); held.listen()
taken, answers, real = held.getsockname()[1], [], rs.free_dashboard_port
def racy(preferred=8265):  # the first answer is taken by 'another Ray' before this one binds it
    answers.append(preferred)
    return taken if len(answers) == 1 else real(preferred)
rs.free_dashboard_port = racy
rs.ensure_ray(None)
import ray
from ray._private.worker import get_dashboard_url
port = int(get_dashboard_url().rsplit(":", 1)[1])
print("ASKED", len(answers), "PORT", port, "TAKEN", taken)

@ray.remote
def lookup():  # what Ray Train's placement-group cleaner does inside the cluster: the State API, address "auto"
    from ray.util.state import list_nodes
    try:
        return "FOUND " + ",".join(n.node_id for n in list_nodes())
    except Exception as exc:
        return "FAILED " + str(exc).splitlines()[-1]

print(ray.get(lookup.remote()), "OWN", ray.get_runtime_context().get_node_id())
ray.shutdown()
"""


@pytest.mark.timeout(180)
def test_a_second_local_ray_retries_a_dashboard_port_taken_before_bind_and_its_state_api_finds_its_own_cluster(keel_ray):
    # The suite's Ray is one instance; the subprocess starts a second, as two `keel run`s (or a `keel sweep`
    # beside the suite) do. The dashboard's port is free when checked and taken when bound: the loser
    # retries on another. Inside it, the State API with address "auto" finds its own cluster, not the other.
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=170,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    asked, port, taken = (int(words[words.index(k) + 1]) for k in ("ASKED", "PORT", "TAKEN"))
    assert asked == 2 and port != taken
    found, own = proc.stdout.split("OWN")
    found = found[found.index("FOUND"):] if "FOUND" in found else found
    assert found.startswith("FOUND ") and found.split()[1] == own.strip(), proc.stdout


def test_the_run_channel_hands_over_every_event_in_order_and_keeps_the_epoch(keel_ray):
    from orchestrator.ray_session import open_run_channel

    channel = open_run_channel()
    for i in range(20):
        channel.put.remote({"i": i})  # fire-and-forget, as rank 0 sends them
    assert [e["i"] for e in keel_ray.get(channel.take.remote())] == list(range(20))  # all, in order
    assert keel_ray.get(channel.take.remote()) == []  # taken once
    keel_ray.get(channel.set.remote(4))
    assert keel_ray.get(channel.get.remote()) == 4  # the epoch clock the per-epoch data stage reads
    keel_ray.kill(channel)


def test_a_finished_runs_channel_serves_the_next_run_of_the_process_emptied(keel_ray):
    from orchestrator.ray_session import borrow_run_channel, give_back_run_channel

    first = borrow_run_channel()
    keel_ray.get([first.put.remote("left over"), first.set.remote(3)])
    give_back_run_channel(first)
    again = borrow_run_channel()  # one actor process fewer for the next run
    assert again._actor_id == first._actor_id
    assert keel_ray.get(again.take.remote()) == [] and keel_ray.get(again.get.remote()) == 0  # nothing of the last run
    other = borrow_run_channel()  # while one is lent, another run gets its own
    assert other._actor_id != again._actor_id
    give_back_run_channel(again, reusable=False)  # someone may still read it: ended, not kept
    give_back_run_channel(other)
    last = borrow_run_channel()
    assert last._actor_id == other._actor_id
    keel_ray.kill(last)


def test_following_a_channel_hands_on_what_was_put_just_before_the_run_ended(keel_ray):
    from orchestrator.ray_session import follow_channel, open_run_channel

    channel, calls, handled = open_run_channel(), [], []

    def done() -> bool:  # the run's last report lands, then fit() returns: both between two polls
        calls.append(1)
        if len(calls) == 2:
            keel_ray.get(channel.put.remote("last report"))
            return True
        return False

    keel_ray.get(channel.put.remote("first"))
    follow_channel(channel, done, handled.append, poll_s=0.01)
    assert handled == ["first", "last report"]
    keel_ray.kill(channel)
