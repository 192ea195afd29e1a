"""F20: the name pool hands out unique readable names under concurrent checkouts, and takes them back."""

from __future__ import annotations

import threading

import redis

from poolq.store import names, registry


def test_concurrent_checkouts_get_unique_names(state: redis.Redis) -> None:
    taken: list[str] = []
    lock = threading.Lock()

    def start_agent(i: int) -> None:
        client = redis.Redis(connection_pool=state.connection_pool)
        agent_id = f"names@host:{1000 + i}"
        registry.publish(client, "names", agent_id, {"state": "starting"})
        name = names.checkout(client, agent_id, "host", 1000 + i)
        with lock:
            taken.append(name)

    threads = [threading.Thread(target=start_agent, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 40 and len(set(taken)) == 40
    assert all(names.lookup(state, "host", 1000 + i) in taken for i in range(40))

    # Checked back in, a name serves again; a dead agent's name is reclaimed
    names.checkin(state, taken[0], "host", 1000)
    assert names.lookup(state, "host", 1000) is None
    for i in range(1, 40):
        registry.remove(state, "names", f"names@host:{1000 + i}")
    state.delete(names.FREE)
    fresh = names.checkout(state, "names@host:2000", "host", 2000)
    assert fresh in taken  # reclaimed from an agent whose record is gone
