"""A serving process's start-up objects frozen out of the garbage collector (runtime/server/heap.py)."""
import gc
import weakref

from gptoss.runtime.server.heap import freeze_startup_objects


class _Node:
    pass


def test_start_up_garbage_is_collected_and_the_rest_frozen():
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    garbage = weakref.ref(a)
    del a, b
    kept = _Node()
    kept.self = kept
    try:
        freeze_startup_objects()
        assert garbage() is None  # collected first, not frozen with the rest
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: no collection walks it
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
