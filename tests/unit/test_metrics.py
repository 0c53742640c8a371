"""Prometheus text rendering of a status snapshot."""

from broker.metrics import render

STATUS = {
    "daemon": {"events": 12, "ring_buffer_drops": 3},
    "latency_us": {"count": 2, "median": 150.0, "p99": 900.0},
    "users": {
        "1001": {
            "name": 'al"ice',
            "counters": {"activations": 4, "misses": 1, "reclaims": 2},
            "accepts": 9,
            "open_connections": 1,
            "drops": 3,
            "slots_free": 1,
            "slots_busy": 2,
        }
    },
}


def test_user_counter_line():
    assert 'broker_activations_total{uid="1001",user="al\\"ice"} 4' in render(STATUS)


def test_missing_counter_omitted():
    assert "broker_gone_total{" not in render(STATUS)


def test_latency_in_seconds():
    assert 'broker_accept_to_move_seconds{quantile="0.99"} 0.000900000' in render(
        STATUS
    )


def test_type_lines_present():
    text = render(STATUS)
    assert "# TYPE broker_slots_free gauge" in text
    assert text.endswith("\n")
