"""The durability tests' child process: writes in a loop, printing each acknowledged write.

    python -m tests.bridge.storage.writer sqlite PATH NAME_PREFIX
    python -m tests.bridge.storage.writer etcd ENDPOINT KEY_PREFIX NAME_PREFIX

Write number k creates ``NAME_PREFIX-k``, except every third one, which updates the object
created two writes before. Each line ``k name resourceVersion`` goes to stdout (flushed) only
after the store acknowledged the write, so the parent may SIGKILL this process at any moment
and then expect every printed write to be there.
"""

from __future__ import annotations

import asyncio
import sys

from bridge.storage import Store
from bridge.storage.etcd import EtcdStore
from bridge.storage.sqlite import SQLiteStore


def operation(k: int, prefix: str) -> tuple[str, str]:
    """What write number ``k`` does: ``("create" | "update", name)``."""
    if k % 3 == 2:
        return "update", f"{prefix}-{k - 2}"
    return "create", f"{prefix}-{k}"


async def write_forever(store: Store, prefix: str) -> None:
    k = 0
    while True:
        kind, name = operation(k, prefix)
        if kind == "create":
            obj = await store.create({"metadata": {"name": name}, "spec": {"write": k}})
        else:
            current = await store.get(name)
            current["spec"]["write"] = k
            version = int(current["metadata"]["resourceVersion"])
            obj = await store.update(current, expected_version=version)
        sys.stdout.write(f"{k} {name} {obj['metadata']['resourceVersion']}\n")
        sys.stdout.flush()
        k += 1


async def main(argv: list[str]) -> None:
    store: Store
    if argv[0] == "sqlite":
        sqlite = SQLiteStore(argv[1])
        await sqlite.open()
        store, prefix = sqlite, argv[2]
    else:
        store, prefix = EtcdStore([argv[1]], prefix=argv[2]), argv[3]
    try:
        await write_forever(store, prefix)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
