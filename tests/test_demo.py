"""`rsaga demo`, small, on embedded fakeredis: the README's first command must work."""

from __future__ import annotations

from rsaga_examples.demo import plan, run_demo

from rsaga.testing import fake_redis


def test_the_plan_expects_what_its_inputs_call_for() -> None:
    orders, trips, outcomes = plan(50, 50, failure_rate=0.3, timeout_rate=0.2, seed=1)
    expected = {o.id: o.expected for o in outcomes if o.kind == "order"}
    for order in orders:
        assert expected[order.order_id] == {
            "ok": "completed", "decline": "failed", "silent": "timed out"
        }[order.payment]
    kinds = {o.expected for o in outcomes if o.kind == "trip"}
    assert kinds == {"completed", "compensated", "timed out"}
    assert len(trips) == 50


async def test_the_demo_ends_every_process_as_expected() -> None:
    lines: list[str] = []
    report = await run_demo(
        fake_redis(), orders=8, trips=8, failure_rate=0.4, timeout_rate=0.0, seed=7,
        progress=lines.append,
    )
    assert report.ok, "\n".join(report.lines())
    actual = {o.actual for o in report.outcomes}
    assert {"completed", "failed", "compensated"} <= actual
    assert lines  # progress was shown
    assert report.lines()[-1] == "result: OK, every process ended as expected"
